"""A checkpoint is data, bound to its run: nothing in it is executed, and a foreign one is skipped."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_contract.config import TrainerConfig
from kubetune_trainer import artifacts
from kubetune_trainer.checkpoints import CHECKPOINT_FILES, CheckpointStore, config_hash
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer

STEPS = 4


class Payload:
    """Unpickling this runs a shell command that creates ``target``: what a planted checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


def config_for(assets: Path, location: Path, run_name: str = "tiny", learning_rate: float = 0.01) -> TrainerConfig:
    config = make_config(assets, location, training={"maxSteps": STEPS, "checkpointEverySteps": 2,
                                                     "evalEverySteps": STEPS, "learningRate": learning_rate})
    config.run_name = run_name
    return config


@pytest.fixture(scope="module")
def finished_run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with the valid checkpoints step-2 and step-4 of config_for(...)."""
    out = tmp_path_factory.mktemp("base")
    Trainer(config_for(assets, out), Reporter(out / "metrics.jsonl")).run()
    run = out / "tiny"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    return run


def copy_run(finished_run: Path, location: Path, run_name: str = "tiny") -> Path:
    """The finished run's checkpoints (only) under ``location/run_name``: as if its pod died at the end."""
    run = location / run_name
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    return run


def read_marker(checkpoint: Path) -> dict[str, Any]:
    marker: dict[str, Any] = json.loads((checkpoint / "checkpoint.json").read_text())
    return marker


def write_marker(checkpoint: Path, marker: dict[str, Any]) -> None:
    (checkpoint / "checkpoint.json").write_text(json.dumps(marker))


def vouch_for(checkpoint: Path, marker: dict[str, Any]) -> None:
    """Make the marker's sizes and sha256 match the files as they are now (a forger can do this too)."""
    for entry in marker["files"]:
        path = checkpoint / entry["name"]
        entry["size"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    write_marker(checkpoint, marker)


def resume_run(assets: Path, location: Path, caplog: pytest.LogCaptureFixture, **kwargs: Any) -> str:
    caplog.clear()
    with caplog.at_level("INFO", logger="kubetune_trainer.train"):
        Trainer(config_for(assets, location, **kwargs), Reporter(location / "metrics.jsonl")).run()
    return caplog.text


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_payload_runs_when_unpickled_without_restrictions(tmp_path: Path) -> None:
    # The control for the tests below: the planted file is really harmful when loaded the old way.
    target = tmp_path / "control"
    torch.save(Payload(target), tmp_path / "payload.pt")
    torch.load(tmp_path / "payload.pt", weights_only=False)
    assert target.exists()


def plant_legacy_rng(checkpoint: Path, payload: Payload) -> None:
    """The previous checkpoint format: rng.pt, loaded with weights_only=False, and a marker without binding."""
    (checkpoint / "rng.safetensors").unlink()
    torch.save(payload, checkpoint / "rng.pt")
    files = sorted(["rng.pt", *(name for name in CHECKPOINT_FILES if name != "rng.safetensors")])
    write_marker(checkpoint, {"step": STEPS, "files": files})


def plant_optimizer(checkpoint: Path, payload: Payload) -> None:
    """The current format with a marker that is right in every respect, run and config hash included."""
    torch.save(payload, checkpoint / "optimizer.pt")
    vouch_for(checkpoint, read_marker(checkpoint))


def plant_scheduler(checkpoint: Path, payload: Payload) -> None:
    torch.save({"last_epoch": payload}, checkpoint / "scheduler.pt")
    vouch_for(checkpoint, read_marker(checkpoint))


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (plant_legacy_rng, "not checkpoint format 2"),
        (plant_optimizer, "optimizer.pt cannot be loaded as plain data"),
        (plant_scheduler, "scheduler.pt cannot be loaded as plain data"),
    ],
    ids=["legacy-rng-pt", "optimizer-pt", "nested-in-scheduler-pt"],
)
def test_planted_pickle_is_rejected_never_executed(
    plant: Callable[[Path, Payload], None], reason: str, assets: Path, finished_run: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = tmp_path / "payload-ran"
    run = copy_run(finished_run, tmp_path / "out")
    plant(run / "checkpoints" / f"step-{STEPS}", Payload(target))

    log = resume_run(assets, tmp_path / "out", caplog)

    assert not target.exists(), "the planted pickle was executed"
    [warning] = warnings(caplog)
    assert f"checkpoint {run}/checkpoints/step-{STEPS} rejected: " in warning and reason in warning
    assert "resuming from step 2 " in log, "the next older valid checkpoint is used"
    assert (run / "manifest.json").is_file()
    # The rejected checkpoint was replaced by the resumed run's own one.
    marker = read_marker(run / "checkpoints" / f"step-{STEPS}")
    assert marker["format"] == 2 and {e["name"] for e in marker["files"]} == set(CHECKPOINT_FILES)
    assert not (run / "checkpoints" / f"step-{STEPS}" / "rng.pt").exists()


def tamper_step(checkpoint: Path) -> None:
    moved = checkpoint.with_name("step-99")
    checkpoint.rename(moved)
    marker = read_marker(moved)
    marker["step"] = 99
    write_marker(moved, marker)


def tamper_files_list(checkpoint: Path) -> None:
    marker = read_marker(checkpoint)
    marker["files"].append({"name": "../../../escaped.txt", "size": 1, "sha256": "0" * 64})
    write_marker(checkpoint, marker)


def tamper_weights(checkpoint: Path) -> None:
    path = checkpoint / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def tamper_rng(checkpoint: Path) -> None:
    from safetensors.torch import save_file

    save_file({"torch": torch.zeros(3, dtype=torch.uint8)}, str(checkpoint / "rng.safetensors"))
    vouch_for(checkpoint, read_marker(checkpoint))


@pytest.mark.parametrize(
    ("tamper", "reason", "rejected_step"),
    [
        (tamper_step, "its step 99 (directory step-99) is outside 1..4", 99),
        (tamper_files_list, "../../../escaped.txt", STEPS),
        (tamper_weights, "trainable.safetensors has size", STEPS),
        (tamper_rng, "rng.safetensors holds no valid torch RNG state", STEPS),
    ],
    ids=["step-out-of-range", "files-list", "changed-file", "bad-rng-state"],
)
def test_tampered_checkpoint_is_rejected_and_an_older_one_used(
    tamper: Callable[[Path], None], reason: str, rejected_step: int, assets: Path, finished_run: Path,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    run = copy_run(finished_run, tmp_path / "out")
    tamper(run / "checkpoints" / f"step-{STEPS}")
    log = resume_run(assets, tmp_path / "out", caplog)
    [warning] = warnings(caplog)
    assert f"checkpoint {run}/checkpoints/step-{rejected_step} rejected: " in warning and reason in warning
    assert "resuming from step 2 " in log
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_checkpoint_of_another_run_is_ignored(
    assets: Path, finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Another run's checkpoints copied (or planted) under this run's prefix.
    run = copy_run(finished_run, tmp_path / "out", run_name="copied")
    log = resume_run(assets, tmp_path / "out", caplog, run_name="copied")
    assert [w for w in warnings(caplog) if "rejected" in w] == [
        f"checkpoint {run}/checkpoints/step-{step} rejected: it belongs to run 'tiny', not 'copied'"
        for step in (STEPS, 2)
    ]
    assert f"no usable checkpoint in {run}/checkpoints; starting from step 0" in log
    assert "resuming" not in log
    # Started fresh: the foreign checkpoints are gone, the run's own ones name it.
    for step in (2, STEPS):
        assert read_marker(run / "checkpoints" / f"step-{step}")["runName"] == "copied"


def test_checkpoint_of_another_config_is_ignored(
    assets: Path, finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = copy_run(finished_run, tmp_path / "out")
    changed = config_for(assets, tmp_path / "out", learning_rate=0.02)
    assert config_hash(changed) != config_hash(config_for(assets, tmp_path / "out"))
    log = resume_run(assets, tmp_path / "out", caplog, learning_rate=0.02)
    rejected = [w for w in warnings(caplog) if "rejected" in w]
    assert len(rejected) == 2 and all("it was written with another config" in w for w in rejected)
    assert "resuming" not in log and "starting from step 0" in log
    for step in (2, STEPS):
        assert read_marker(run / "checkpoints" / f"step-{step}")["configHash"] == config_hash(changed)


def test_config_hash_ignores_cadence_but_not_hyperparameters(assets: Path, tmp_path: Path) -> None:
    base = config_for(assets, tmp_path)
    cadence = base.model_copy(deep=True)
    cadence.training.checkpoint_every_steps, cadence.training.log_every_steps = 50, 5
    cadence.output.keep_checkpoints = 7
    assert config_hash(cadence) == config_hash(base)
    for section, field, value in [("training", "seed", 8), ("lora", "r", 4), ("dataset", "max_length", 64)]:
        changed = base.model_copy(deep=True)
        setattr(getattr(changed, section), field, value)
        assert config_hash(changed) != config_hash(base), f"{section}.{field}"


def test_grad_scaler_state_is_checkpointed_and_restored(assets: Path, tmp_path: Path) -> None:
    from transformers import get_scheduler

    trainer = Trainer(config_for(assets, tmp_path / "out"), Reporter(tmp_path / "metrics.jsonl"))
    config = trainer.config
    trainer.store = artifacts.open_store(config.output.location, config.run_name, config.storage)
    trainer.checkpoints = CheckpointStore(trainer.store, config, trainer.work)
    trainer.progress.total_steps = 1
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = get_scheduler("constant", optimizer)
    # fp16 training keeps a GradScaler (CUDA only in training; its state is the same on the CPU).
    scaler = torch.amp.GradScaler("cpu")
    saved = {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7,
             "_growth_tracker": 3}
    scaler.load_state_dict(saved)
    trainer.checkpoint(model, optimizer, scheduler, scaler, 1)

    fresh = torch.amp.GradScaler("cpu")
    assert fresh.state_dict() != saved
    assert trainer.resume(model, optimizer, scheduler, fresh) == 1
    assert fresh.state_dict() == saved
    trainer.close()
