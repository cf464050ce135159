"""What a finished run leaves: the adapter (or the fully trained model), the merged model, the
evaluation (evaluation.json, predictions.jsonl), the config, the metrics, the model card and the loss
plot, staged in a local directory and published to the store with its manifest (artifacts.publish);
and the summary."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubetune_contract import events
from kubetune_contract.config import TrainerConfig
from kubetune_contract.events import DatasetStats, Lineage

from . import artifacts, data, evaluation, lineage, oci
from . import model as model_lib
from .sources import sha256_of

log = logging.getLogger(__name__)

@dataclass
class FinalModel:
    """What the outputs take from the trained model, gathered before rank 0 publishes them."""

    evaluation: evaluation.Result
    state: dict[str, torch.Tensor] | None
    """A sharded model's trained weights (and persistent buffers), whole; None for an unsharded one,
    which saves from its own parameters."""


@dataclass
class Staged:
    """Where the outputs are staged, and what the run recorded for them."""

    directory: Path
    metrics_path: Path  # metrics.jsonl
    events: list[dict[str, Any]]  # progress events, for the loss plot
    train_samples: int
    validation_samples: int
    dataset: DatasetStats | None = None  # the data's statistics
    samples_text: str = ""  # samples.txt
    lineage: Lineage | None = None  # what made the outputs (lineage.py)
    validation: list[data.Example] = field(default_factory=list)  # the merged model answers the first few
    log: Path | None = None  # rank 0's log so far: published as trainer.log


def publish(config: TrainerConfig, store: artifacts.Store, staged: Staged, model: Any, tokenizer: Any,
            model_path: Path, final: FinalModel, precision: model_lib.Precision, metrics: dict[str, Any],
            step: int, total_steps: int | None, epoch: float, registry: oci.Registry | None = None) -> dict[str, Any]:
    """Save the outputs to the staging directory, publish them (and push them to output.oci's
    ``registry``), and return the summary."""
    out = staged.directory
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    evaluated = final.evaluation.document(config)
    (out / "evaluation.json").write_text(json.dumps(evaluated, indent=2) + "\n")
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in final.evaluation.predictions))
    adapter_dir = merged_dir = merge_check = None
    if config.lora.enabled:
        adapter_dir = out / "adapter"
        # A sharded model saves from its gathered state: the same files as an unsharded one.
        model.save_pretrained(str(adapter_dir), state_dict=final.state)
        # Name the backbone by its source, not by the local cache path it was loaded from.
        adapter_config = adapter_dir / "adapter_config.json"
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = config.model.source
        settings["revision"] = config.model.revision
        adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
        tokenizer.save_pretrained(str(adapter_dir))
        if config.output.merge_adapter:
            merged_dir = out / "merged"
            merge_check = export_merged(model_path, adapter_dir, merged_dir, config, precision, tokenizer,
                                        staged.validation[:MERGE_CHECK_PROMPTS])
    else:
        merged_dir = out / "model"
        model.save_pretrained(str(merged_dir), state_dict=final.state)
        tokenizer.save_pretrained(str(merged_dir))
    if staged.samples_text:
        (out / "samples.txt").write_text(staged.samples_text)
    config_json = config.model_dump(by_alias=True, mode="json")
    (out / "trainer_config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    shutil.copyfile(staged.metrics_path, out / "metrics.jsonl")
    extra = {
        "trainSamples": staged.train_samples,
        "validationSamples": staged.validation_samples,
        "totalSteps": total_steps,
        "dataset": staged.dataset.model_dump(by_alias=True, exclude_none=True) if staged.dataset else {},
    }
    found = lineage.as_json(staged.lineage) if staged.lineage else {}
    (out / "README.md").write_text(artifacts.model_card(config_json, metrics, extra, evaluated, found))
    artifacts.plot_losses(staged.events, out / "loss.png")
    if staged.log is not None and staged.log.is_file():
        shutil.copyfile(staged.log, out / "trainer.log")
    manifest = artifacts.publish(out, store, lineage=found or None)
    uri = store.uri
    pushed = None
    if registry is not None and config.output.oci is not None:
        pushed = oci.push(registry, config.output.oci, out, manifest, uri,
                          staged.lineage.finished_at if staged.lineage else None)
    summary = events.Summary(
        step=step,
        total_steps=total_steps,
        epoch=round(epoch, 4),
        metrics=events.Metrics.model_validate(metrics),
        artifacts=events.Artifacts(
            location=uri,
            adapter=f"{uri}/adapter" if adapter_dir else None,
            merged=f"{uri}/{merged_dir.name}" if merged_dir else None,
            manifest=f"{uri}/{artifacts.MANIFEST}",
            total_bytes=manifest["totalBytes"],
            files=len(manifest["files"]),
            merge_check=merge_check,
            lineage=staged.lineage,
            manifest_sha256=sha256_of(out / artifacts.MANIFEST),
            oci_digest=pushed.digest if pushed else None,
            oci_reference=str(pushed) if pushed else None,
        ),
    )
    result = summary.model_dump(by_alias=True, exclude={"error", "exit_code", "evaluation", "dataset"})
    # As evaluation.json has it, without the gate's verdict (the operator checks the job's gate
    # itself) or empty fields: the termination message is small.
    result["evaluation"] = {k: v for k, v in evaluated.items() if k != "gate"}
    result["dataset"] = extra["dataset"] or None
    return result


MERGE_CHECK_PROMPTS = 3
"""Validation prompts the merged model answers, to compare with base + adapter."""
MERGE_CHECK_TOKENS = 32
"""At most this many new tokens per answer (evaluation.maxNewTokens when lower): the check runs on the CPU."""
MERGE_SHARD_SIZE = "5GB"
"""Largest safetensors shard of a merged model (an index names the shards)."""


def export_merged(model_path: Path, adapter_dir: Path, out: Path, config: TrainerConfig,
                  precision: model_lib.Precision, tokenizer: Any, examples: list[data.Example]) -> str:
    """Merge the adapter into the backbone, loaded afresh and unquantized on the CPU in
    output.mergePrecision, and save a complete Hugging Face model directory: config, generation
    config, sharded safetensors, tokenizer and chat template. Then load that directory alone and
    compare its greedy answers to ``examples`` with base + adapter's; return what the check found."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    choice = config.output.merge_precision
    dtype = precision.dtype if choice == "auto" else model_lib.resolve_precision(choice, torch.device("cpu")).dtype
    remote = config.model.trust_remote_code
    log.info("merging the adapter into %s (%s)", config.model.source, dtype)
    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, trust_remote_code=remote)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    expected = greedy_answers(adapted, tokenizer, config, examples)
    merged = adapted.merge_and_unload()
    merged.save_pretrained(str(out), max_shard_size=MERGE_SHARD_SIZE)
    tokenizer.save_pretrained(str(out))
    del base, adapted, merged
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype, trust_remote_code=remote)
    got = greedy_answers(reloaded, tokenizer, config, examples)
    equal = sum(a == b for a, b in zip(expected, got, strict=True))
    check = f"greedy answers equal base + adapter on {equal} of {len(examples)} prompts ({str(dtype).split('.')[-1]})"
    if equal < len(examples):
        log.warning("merged model: %s; the merge rounds the weights to %s", check, dtype)
    else:
        log.info("merged model: %s", check)
    return check


def greedy_answers(model: Any, tokenizer: Any, config: TrainerConfig, examples: list[data.Example]) -> list[str]:
    """Greedy answers on the CPU, one prompt at a time (no padding to tell two models apart)."""
    chat = data.use_chat_template(config.dataset, tokenizer)
    prompts = [data.prompt_ids(e, config.dataset, tokenizer, chat)[-config.dataset.max_length:] for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: dict[int, str] = {}
    model.eval()
    tokens = min(config.evaluation.max_new_tokens, MERGE_CHECK_TOKENS)
    evaluation.generate_batches(model, tokenizer, prompts, list(range(len(prompts))), 1, tokens, pad,
                                torch.device("cpu"), answers, use_cache=True, sharded=False)
    return [answers[i] for i in range(len(prompts))]
