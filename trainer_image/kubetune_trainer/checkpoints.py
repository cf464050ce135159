"""Checkpoints: what a checkpoint directory holds, the hash of the config it belongs to, the strict
reading of one (safetensors, torch.load with weights_only, shapes and dtypes checked), and the run's
checkpoints in the object store (`CheckpointStore`: write with the marker last, prune, read back
verified). What goes into one and applying it to the model are the Trainer's (train.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kubetune_contract.config import TrainerConfig

from . import artifacts, distributed
from . import model as model_lib
from .sources import sha256_of

log = logging.getLogger(__name__)

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


def save_local(local: Path, trained: dict[str, torch.Tensor], optimizer_state: dict[str, Any], scheduler: Any,
               scaler: Any, metrics_path: Path, step: int, epoch: float) -> None:
    """Write the files of the checkpoint of `step` (CHECKPOINT_FILES) into `local`: the trained
    weights, the optimizer, scheduler and grad-scaler states, the RNG states and metrics.jsonl."""
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir()
    save_file(trained, str(local / "trainable.safetensors"))
    torch.save(optimizer_state, local / "optimizer.pt")
    torch.save(scheduler.state_dict(), local / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(local / "rng.safetensors"))
    shutil.copyfile(metrics_path, local / "metrics.jsonl")
    version, internal, gauss = random.getstate()
    state = {
        "step": step,
        "epoch": epoch,
        "pythonRandom": {"version": version, "state": list(internal), "gauss": gauss},
        "gradScaler": scaler.state_dict(),
    }
    (local / "state.json").write_text(json.dumps(state))


def apply_states(loaded: LoadedCheckpoint, model: Any, optimizer: Any, scheduler: Any, scaler: Any, *,
                 sharded: bool) -> None:
    """Load a checkpoint's weights, optimizer, scheduler, grad-scaler and RNG states (a sharded
    model's collectively, on every rank)."""
    if sharded:
        distributed.load_sharded_state(model, optimizer, loaded.trainable, loaded.optimizer)
    else:
        model_lib.load_trainable_state(model, loaded.trainable)
        optimizer.load_state_dict(loaded.optimizer)
    scheduler.load_state_dict(loaded.scheduler)
    if loaded.grad_scaler and scaler.is_enabled():
        scaler.load_state_dict(loaded.grad_scaler)
    torch.set_rng_state(loaded.torch_rng)
    if torch.cuda.is_available():
        for index, state in enumerate(loaded.cuda_rng[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    random.setstate(loaded.python_rng)


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


class CheckpointStore:
    """The run's checkpoints in its object store, under ``checkpoints/step-<N>/``.

    A checkpoint is complete once its marker (written last) lists every file with its size and
    sha256; reading one back checks the marker, the run, the config hash and every file before
    `parse_checkpoint`. Steps whose checkpoint was refused are kept in `rejected` until pruned."""

    def __init__(self, store: artifacts.Store, config: TrainerConfig, work: Path) -> None:
        self.store, self.config, self.work = store, config, work
        self.rejected: set[int] = set()

    @property
    def uri(self) -> str:
        return f"{self.store.uri}/{CHECKPOINT_DIR}"

    def write(self, local: Path, step: int) -> str:
        """Upload the files of `local` (CHECKPOINT_FILES) as the checkpoint of `step`, the marker
        last; returns where it is."""
        prefix = f"{CHECKPOINT_DIR}/step-{step}"
        if step in self.rejected:
            # Nothing of a rejected checkpoint of the same step may stay next to the new files.
            self.delete(step)
            self.rejected.discard(step)
        files = []
        for name in CHECKPOINT_FILES:
            path = local / name
            files.append({"name": name, "size": path.stat().st_size, "sha256": sha256_of(path)})
            self.store.put_file(path, f"{prefix}/{name}")
        marker = local / CHECKPOINT_MARKER
        marker.write_text(json.dumps({
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "runName": self.config.run_name,
            "configHash": config_hash(self.config),
            "files": files,
        }))
        self.store.put_file(marker, f"{prefix}/{CHECKPOINT_MARKER}")
        return f"{self.store.uri}/{prefix}"

    def steps(self) -> tuple[list[int], list[int]]:
        """Steps of the complete and of the incomplete checkpoints in the store, oldest first."""
        keys = self.store.list(f"{CHECKPOINT_DIR}/")
        steps: dict[int, bool] = {}
        for key in keys:
            parts = key.split("/")
            if len(parts) == 3 and parts[1].startswith("step-") and parts[1][5:].isdigit():
                step = int(parts[1][5:])
                steps[step] = steps.get(step, False) or parts[2] == CHECKPOINT_MARKER
        complete = sorted(s for s, done in steps.items() if done)
        return complete, sorted(s for s, done in steps.items() if not done)

    def prune(self) -> None:
        """Keep the newest output.keepCheckpoints valid checkpoints; drop rejected and older partial ones."""
        complete, incomplete = self.steps()
        valid = [s for s in complete if s not in self.rejected]
        stale = valid[: -self.config.output.keep_checkpoints]
        newest = valid[-1] if valid else -1
        stale += [s for s in complete if s in self.rejected]
        stale += [s for s in incomplete if s < newest]
        for step in stale:
            self.delete(step)
        self.rejected.difference_update(stale)

    def delete(self, step: int) -> None:
        keys = self.store.list(f"{CHECKPOINT_DIR}/step-{step}/")
        # The marker first: a half-deleted checkpoint must not look complete.
        for key in sorted(keys, key=lambda k: not k.endswith(CHECKPOINT_MARKER)):
            self.store.delete(key)

    def newest_valid(self, total_steps: int, model: Any, scheduler: Any) -> LoadedCheckpoint | None:
        """The newest checkpoint of this run that passes every check, read but not applied."""
        complete, _ = self.steps()
        for step in reversed(complete):
            try:
                return self.read(step, total_steps, model, scheduler)
            except RejectedCheckpoint as err:
                log.warning("checkpoint %s/step-%d rejected: %s", self.uri, step, err)
                self.rejected.add(step)
        return None

    def read(self, step: int, total_steps: int, model: Any, scheduler: Any) -> LoadedCheckpoint:
        """Download and check one checkpoint without touching the model; raise RejectedCheckpoint."""
        prefix = f"{CHECKPOINT_DIR}/step-{step}"
        local = self.work / "resume" / f"step-{step}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        self.store.get_file(f"{prefix}/{CHECKPOINT_MARKER}", local / CHECKPOINT_MARKER)
        try:
            marker = json.loads((local / CHECKPOINT_MARKER).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RejectedCheckpoint(f"{CHECKPOINT_MARKER} is not JSON: {err}") from err
        if not isinstance(marker, dict) or marker.get("format") != CHECKPOINT_FORMAT:
            raise RejectedCheckpoint(
                f"{CHECKPOINT_MARKER} is not checkpoint format {CHECKPOINT_FORMAT} (written by an older trainer, "
                "or not by the trainer at all)"
            )
        if marker.get("runName") != self.config.run_name:
            raise RejectedCheckpoint(
                f"it belongs to run {marker.get('runName')!r}, not {self.config.run_name!r}"
            )
        if marker.get("configHash") != config_hash(self.config):
            raise RejectedCheckpoint(
                "it was written with another config (configHash differs in the model, dataset, training, lora "
                "or quantization section)"
            )
        if marker.get("step") != step or not 1 <= step <= total_steps:
            raise RejectedCheckpoint(
                f"its step {marker.get('step')!r} (directory step-{step}) is outside 1..{total_steps}"
            )
        files = marker.get("files")
        entries: list[dict[str, Any]] = files if isinstance(files, list) else []
        names = sorted(str(e.get("name")) for e in entries if isinstance(e, dict))
        if len(names) != len(entries) or names != list(CHECKPOINT_FILES):
            raise RejectedCheckpoint(f"its files list {files!r} does not name exactly {list(CHECKPOINT_FILES)}")
        present = {key.rsplit("/", 1)[-1] for key in self.store.list(f"{prefix}/")}
        missing = sorted(set(CHECKPOINT_FILES) - present)
        if missing:
            raise RejectedCheckpoint(f"{', '.join(missing)} listed in {CHECKPOINT_MARKER} but missing")
        for entry in entries:
            name, path = entry["name"], local / entry["name"]
            self.store.get_file(f"{prefix}/{name}", path)
            size, digest = path.stat().st_size, sha256_of(path)
            if size != entry.get("size") or digest != entry.get("sha256"):
                raise RejectedCheckpoint(f"{name} has size {size} sha256 {digest}, the marker says "
                                         f"{entry.get('size')} {entry.get('sha256')}")
        return parse_checkpoint(local, step, model, scheduler)
