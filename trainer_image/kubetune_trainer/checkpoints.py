"""The checkpoint format: what a checkpoint directory holds, the hash of the config it belongs to,
and the strict reading of one (safetensors, torch.load with weights_only, shapes and dtypes checked).
Writing, pruning and choosing the checkpoint to resume from are the Trainer's (train.py)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kubetune_contract.config import TrainerConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_MARKER = "checkpoint.json"
"""Written last into a checkpoint directory: a checkpoint without it is incomplete and ignored."""
CHECKPOINT_FORMAT = 2
CHECKPOINT_FILES = (
    "metrics.jsonl", "optimizer.pt", "rng.safetensors", "scheduler.pt", "state.json", "trainable.safetensors",
)
"""Every file of a checkpoint, sorted; the marker lists exactly these with their sizes and sha256."""
CONFIG_HASH_SECTIONS = ("model", "dataset", "training", "lora", "quantization")
CADENCE_FIELDS = ("evalEverySteps", "checkpointEverySteps", "logEverySteps", "memoryFraction")
"""training fields that do not change what is trained (the micro-batch that batchSize auto chooses
keeps each step's samples and loss weighting): left out of the config hash."""


def config_hash(config: TrainerConfig) -> str:
    """sha256 of what decides the trained weights: the model, dataset, training, lora and quantization
    sections (camelCase JSON, sorted keys), without the evaluation/checkpoint/log cadence and
    memoryFraction; an unset globalBatchSize is left out, so that configs written before it existed
    keep their hash."""
    sections = config.model_dump(by_alias=True, mode="json", include=set(CONFIG_HASH_SECTIONS))
    for name in CADENCE_FIELDS:
        sections["training"].pop(name, None)
    if sections["training"].get("globalBatchSize") is None:
        sections["training"].pop("globalBatchSize", None)
    return hashlib.sha256(json.dumps(sections, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RejectedCheckpoint(Exception):
    """A checkpoint that must not be resumed from; the message says why."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint read and checked, not yet applied to the model and optimizer."""

    step: int
    epoch: float
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    grad_scaler: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: tuple[Any, ...]
    metrics: str
    events: list[dict[str, Any]]


GRAD_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def parse_checkpoint(local: Path, step: int, model: Any, scheduler: Any) -> LoadedCheckpoint:
    """Read the files of a downloaded checkpoint as plain data and check them against the model.

    Tensors come from safetensors; the optimizer and scheduler states through ``torch.load`` with
    ``weights_only=True`` (tensors and plain containers only: a pickle that names any other callable
    is refused, never run). Raises RejectedCheckpoint.
    """
    try:
        trainable = load_file(str(local / "trainable.safetensors"))
    except Exception as err:
        raise RejectedCheckpoint(f"trainable.safetensors cannot be read: {err}") from err
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    got = {name: tuple(t.shape) for name, t in trainable.items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
        raise RejectedCheckpoint(f"trainable.safetensors does not match the model's trained weights: {differ[:3]}")

    states: dict[str, dict[str, Any]] = {}
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            state = torch.load(local / name, weights_only=True)
        except Exception as err:  # pickle.UnpicklingError for anything but tensors and containers
            raise RejectedCheckpoint(f"{name} cannot be loaded as plain data: {err}") from err
        if not isinstance(state, dict):
            raise RejectedCheckpoint(f"{name} holds {type(state).__name__}, not a state dict")
        states[name] = state
    if not {"state", "param_groups"} <= set(states["optimizer.pt"]):
        raise RejectedCheckpoint("optimizer.pt is not an optimizer state dict")
    if set(states["scheduler.pt"]) != set(scheduler.state_dict()):
        raise RejectedCheckpoint(f"scheduler.pt has keys {sorted(states['scheduler.pt'])}, "
                                 f"the scheduler has {sorted(scheduler.state_dict())}")

    try:
        rng = load_file(str(local / "rng.safetensors"))
    except Exception as err:
        raise RejectedCheckpoint(f"rng.safetensors cannot be read: {err}") from err
    torch_rng = rng.get("torch")
    if torch_rng is None or torch_rng.dtype != torch.uint8 or torch_rng.shape != torch.get_rng_state().shape:
        raise RejectedCheckpoint("rng.safetensors holds no valid torch RNG state")
    cuda_keys = sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]) if k[5:].isdigit() else -1)
    if set(rng) - {"torch", *cuda_keys} or cuda_keys != [f"cuda.{i}" for i in range(len(cuda_keys))] or any(
        rng[k].dtype != torch.uint8 or rng[k].dim() != 1 for k in cuda_keys
    ):
        raise RejectedCheckpoint(f"rng.safetensors has unexpected tensors {sorted(rng)}")

    try:
        state = json.loads((local / "state.json").read_text())
        python_random = state["pythonRandom"]
        python_rng = (python_random["version"], tuple(python_random["state"]), python_random["gauss"])
        random.Random().setstate(python_rng)  # validates without touching the global generator
        epoch = float(state["epoch"])
        grad_scaler = state["gradScaler"]
        if state["step"] != step or not isinstance(grad_scaler, dict):
            raise ValueError(f"step {state['step']!r}, gradScaler {grad_scaler!r}")
        if grad_scaler and (set(grad_scaler) != GRAD_SCALER_KEYS or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in grad_scaler.values()
        )):
            raise ValueError(f"gradScaler {grad_scaler!r}")
    except Exception as err:
        raise RejectedCheckpoint(f"state.json is not a valid training state: {type(err).__name__}: {err}") from err

    try:
        metrics = (local / "metrics.jsonl").read_text()
        events = [json.loads(line) for line in metrics.splitlines() if line]
        if not all(isinstance(e, dict) for e in events):
            raise ValueError("a line is not a JSON object")
    except Exception as err:
        raise RejectedCheckpoint(f"metrics.jsonl is not JSON lines: {err}") from err

    return LoadedCheckpoint(
        step=step, epoch=epoch, trainable=trainable, optimizer=states["optimizer.pt"],
        scheduler=states["scheduler.pt"], grad_scaler=grad_scaler, torch_rng=torch_rng,
        cuda_rng=[rng[k] for k in cuda_keys], python_rng=python_rng, metrics=metrics, events=events,
    )
