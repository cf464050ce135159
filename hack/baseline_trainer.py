"""The practitioners' baseline for the trainer benchmarks: transformers.Trainer + peft.

    python hack/baseline_trainer.py --config CONFIG.yaml --out result.json [--census census.json]

Trains what a KubeTune trainer config describes the way it is usually written by hand:
``BitsAndBytesConfig`` → ``from_pretrained`` → ``prepare_model_for_kbit_training`` (int8/int4) →
``LoraConfig`` → ``get_peft_model`` → ``transformers.Trainer``, with the config's micro-batch,
gradient accumulation, steps, learning rate and schedule, optimizer, precision and gradient
checkpointing. The inputs are the KubeTune trainer's own: its data loading, tokenization, packing
and collation (``kubetune_trainer.data``), so both sides train on the same tokenized samples; only
their order differs (each side's own seeded shuffle). The training loop is Trainer's.

Throughput, defined as the KubeTune trainer measures it: the input tokens (padding excluded) of
the optimizer steps after the warm-up, divided by the wall time from the end of the warm-up's last
step to the end of the last step, the device synchronised at both ends. The warm-up ends at the
KubeTune trainer's last progress report before the end (a multiple of ``training.logEverySteps``,
see :func:`measured_window`); its final report's tokens/s covers the same steps. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and the process's peak RSS on the CPU, as the KubeTune
trainer reports it. The result goes to ``--out`` as JSON (and to stdout as one line).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune_contract.config import TrainerConfig, load_config
from kubetune_trainer import census, data, sources
from kubetune_trainer.data import load_datasets
from kubetune_trainer.steps import total_steps

OPTIMIZERS = {
    "adamw": "adamw_torch_fused",  # Trainer's default with torch >= 2.8
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "sgd": "sgd",
}
"""training.optimizer → TrainingArguments.optim."""


def measured_window(steps: int, log_every: int) -> tuple[int, int]:
    """The warm-up's last step and the run's last step: throughput counts the steps in between.

    The KubeTune trainer's throughput in a progress report covers the steps since its previous
    report; its last report (at ``steps``) follows the one at the last multiple of
    ``log_every`` before it. A benchmark sets ``logEverySteps`` to the warm-up length, at least
    half the steps, so that this window is exactly the steps after the warm-up.
    """
    return log_every * ((steps - 1) // log_every), steps


class TokenCountingCollator:
    """The KubeTune trainer's collation, recording each batch's input tokens in the order made."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.batch_tokens: list[int] = []

    def __call__(self, batch: list[data.Sample]) -> dict[str, torch.Tensor]:
        self.batch_tokens.append(sum(len(sample.input_ids) for sample in batch))
        return data.collate(batch, self.pad_id)


class StepClock(TrainerCallback):
    """Timestamps the end of the warm-up's last step and of the last step, the device synchronised.

    Counts the micro-batches trained (one per substep or step end), so that the tokens of the
    window are those of the batches the collator made for it, however far the data loader reads
    ahead.
    """

    def __init__(self, collator: TokenCountingCollator, start: int, end: int) -> None:
        self.collator, self.start, self.end = collator, start, end
        self.batches = 0
        self.marks: dict[int, tuple[float, int]] = {}
        """step → (time, tokens trained up to the end of that step)."""

    def _mark(self, step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks[step] = (time.perf_counter(), sum(self.collator.batch_tokens[: self.batches]))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self.start == 0:
            self._mark(0)

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.batches += 1

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.batches += 1
        if state.global_step in (self.start, self.end):
            self._mark(state.global_step)

    def tokens_per_second(self) -> tuple[int, float]:
        """Tokens and seconds of the window (steps ``start + 1`` to ``end``)."""
        (t0, n0), (t1, n1) = self.marks[self.start], self.marks[self.end]
        return n1 - n0, t1 - t0


class Census(TrainerCallback):
    """The memory census of the first steps (kubetune_trainer.census), as the KubeTune trainer takes it."""

    def __init__(self, path: Path) -> None:
        self.record = census.recorder(path)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.record(state.global_step, kwargs["model"], kwargs["optimizer"])


class SampleDataset(torch.utils.data.Dataset[data.Sample]):
    """Tokenized samples as a map-style dataset, for Trainer's data loader."""

    def __init__(self, samples: list[data.Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> data.Sample:
        return self.samples[index]


def compute_dtype(precision: str) -> torch.dtype:
    """training.precision as the KubeTune trainer reads it: auto is bf16 on a capable GPU, else fp32."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_model(path: Path, config: TrainerConfig, dtype: torch.dtype) -> Any:
    """BitsAndBytesConfig → from_pretrained → prepare_model_for_kbit_training → LoraConfig → get_peft_model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if config.quantization == "int8":
        quantization = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    elif config.quantization == "int4":
        quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    kwargs: dict[str, Any] = {"dtype": dtype if config.lora.enabled else torch.float32,
                              "trust_remote_code": config.model.trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": 0 if torch.cuda.is_available() else "cpu"}
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.config.use_cache = False
    if quantization is not None:
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=config.training.gradient_checkpointing is True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if config.lora.enabled:
        targets = config.lora.target_modules
        model = get_peft_model(model, LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets), task_type="CAUSAL_LM",
        ))
    return model


def training_arguments(config: TrainerConfig, steps: int, dtype: torch.dtype, out: Path) -> TrainingArguments:
    """The config's training section as TrainingArguments; no saving, no evaluation and no logging
    inside the measured window (the KubeTune trainer's reports are outside its timing too)."""
    tc = config.training
    if not isinstance(tc.batch_size, int):
        raise ValueError("training.batchSize auto: the baseline needs a fixed micro-batch")
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation,
        learning_rate=tc.learning_rate,
        weight_decay=tc.weight_decay,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=int(tc.warmup_ratio * steps),  # as the KubeTune trainer rounds it
        max_grad_norm=tc.max_grad_norm,
        seed=tc.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=tc.gradient_checkpointing is True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=OPTIMIZERS[tc.optimizer],
        optim_args="momentum=0.9" if tc.optimizer == "sgd" else None,  # the KubeTune trainer's SGD
        label_names=["labels"],
        remove_unused_columns=False,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=steps,
        report_to="none",
        disable_tqdm=True,
    )


def peak_memory_bytes() -> tuple[int, str]:
    """The process's peak: GPU memory allocated on CUDA, resident memory on the CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS"


def run_baseline(config: TrainerConfig, census_path: Path | None = None) -> dict[str, Any]:
    """Train ``config`` with transformers.Trainer + peft; return its throughput and peak memory."""
    import peft
    import transformers
    from transformers import AutoTokenizer, Trainer, set_seed

    started = time.perf_counter()
    tc = config.training
    datasets = load_datasets(config)
    model_path = sources.resolve(config.model.source, config.storage, config.model.revision, directory=True)
    tokenizer_path = (sources.resolve(config.model.tokenizer, config.storage, config.model.revision, directory=True)
                      if config.model.tokenizer else model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_samples = data.tokenize(datasets.train, config.dataset, tokenizer)
    val_samples = data.tokenize(datasets.validation, config.dataset, tokenizer)
    if tc.packing:
        train_samples = data.pack(train_samples, config.dataset.max_length)
    steps = total_steps(config, len(train_samples))
    start, end = measured_window(steps, tc.log_every_steps)

    dtype = compute_dtype(tc.precision)
    set_seed(tc.seed)
    model = load_model(model_path, config, dtype)
    collator = TokenCountingCollator(tokenizer.pad_token_id)
    clock = StepClock(collator, start, end)
    with tempfile.TemporaryDirectory(prefix="kubetune-baseline-") as out:
        trainer = Trainer(
            model=model,
            args=training_arguments(config, steps, dtype, Path(out)),
            train_dataset=SampleDataset(train_samples),
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[clock, *([Census(census_path)] if census_path else [])],
        )
        train_output = trainer.train()
        eval_metrics = trainer.evaluate(SampleDataset(val_samples))
    tokens, seconds = clock.tokens_per_second()
    peak, peak_kind = peak_memory_bytes()
    return {
        "side": "baseline",
        "trainer": "transformers.Trainer + peft",
        "quantization": config.quantization,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "steps": steps,
        "window": {"firstStep": start + 1, "lastStep": end, "tokens": tokens, "seconds": round(seconds, 4)},
        "tokensPerSecond": tokens / max(seconds, 1e-9),
        "peakMemoryBytes": peak,
        "peakMemory": peak_kind,
        "trainLoss": train_output.training_loss,
        "evalLoss": eval_metrics.get("eval_loss"),
        "wallSeconds": round(time.perf_counter() - started, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="a KubeTune trainer config (YAML or JSON)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the result (JSON)")
    parser.add_argument("--census", type=Path, help="where to write the memory census of the first steps (JSON)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    auto = [name for name, value in (("training.batchSize", config.training.batch_size),
                                     ("training.gradientCheckpointing", config.training.gradient_checkpointing))
            if value == "auto"]
    if auto:  # transformers.Trainer has no such choice: the comparison needs fixed settings
        print(f"{args.config}: {', '.join(auto)}: auto is not supported by the baseline; give a fixed value",
              file=sys.stderr)
        return 3
    result = run_baseline(config, args.census)
    if not math.isfinite(result["tokensPerSecond"]) or result["tokensPerSecond"] <= 0:
        print(f"no throughput measured: {result['window']}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
