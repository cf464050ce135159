"""What a finished run leaves: the adapter (or the fully trained model), the merged model, the
evaluation (evaluation.json, predictions.jsonl), the config, the metrics, the model card and the loss
plot, staged in a local directory and published to the store with its manifest (artifacts.publish);
and the summary."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_contract import events
from kubetune_contract.config import TrainerConfig
from kubetune_contract.events import DatasetStats

from . import artifacts, evaluation
from . import model as model_lib
from .errors import InvalidInput

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


def publish(config: TrainerConfig, store: artifacts.Store, staged: Staged, model: Any, tokenizer: Any,
            model_path: Path, final: FinalModel, precision: model_lib.Precision, metrics: dict[str, Any],
            step: int, total_steps: int | None, epoch: float) -> dict[str, Any]:
    """Save the outputs to the staging directory, publish them, and return the summary."""
    out = staged.directory
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    evaluated = final.evaluation.document(config)
    (out / "evaluation.json").write_text(json.dumps(evaluated, indent=2) + "\n")
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in final.evaluation.predictions))
    adapter_dir = merged_dir = None
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
            merge_adapter(model_path, adapter_dir, merged_dir, config, precision)
            tokenizer.save_pretrained(str(merged_dir))
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
    (out / "README.md").write_text(artifacts.model_card(config_json, metrics, extra, evaluated))
    artifacts.plot_losses(staged.events, out / "loss.png")
    manifest = artifacts.publish(out, store)
    uri = store.uri
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
        ),
    )
    result = summary.model_dump(by_alias=True, exclude={"error", "exit_code", "evaluation", "dataset"})
    # As evaluation.json has it, without the gate's verdict (the operator checks the job's gate
    # itself) or empty fields: the termination message is small.
    result["evaluation"] = {k: v for k, v in evaluated.items() if k != "gate"}
    result["dataset"] = extra["dataset"] or None
    return result


def merge_adapter(
    model_path: Path, adapter_dir: Path, out: Path, config: TrainerConfig, precision: model_lib.Precision
) -> None:
    """Merge the adapter into the unquantized backbone (loaded afresh on the CPU) and save it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if config.quantization == "int4":  # config.py rejects this; keep the rule in one place
        raise InvalidInput("output.mergeAdapter is not supported with quantization int4")
    log.info("merging the adapter into %s (%s)", config.model.source, precision.dtype)
    base = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=precision.dtype, trust_remote_code=config.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
