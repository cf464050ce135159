"""A killed run resumes from its newest complete checkpoint and ends where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.helpers import wait_for
from tests.support.trainer import REPO, make_config, tiny_config

pytestmark = pytest.mark.trainer

STEPS = 150



def trainer_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "kubetune_trainer", "--config", str(config)]


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(assets: Path, tmp_path: Path) -> None:
    def config_for(name: str) -> Path:
        # Dropout on, so the restored RNG state matters as much as the weights and the optimizer.
        cfg = tiny_config(
            assets, tmp_path / name,
            training={"maxSteps": STEPS, "batchSize": 4, "checkpointEverySteps": 5, "evalEverySteps": 50},
            lora={"r": 4, "alpha": 8, "dropout": 0.1},
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    run_dir = tmp_path / "resumed" / "tiny"
    first_marker = run_dir / "checkpoints" / "step-5" / "checkpoint.json"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(trainer_cmd(config_for("resumed")), stdout=subprocess.DEVNULL, stderr=log,
                                env=env, cwd=REPO)
        try:
            wait_for(lambda: first_marker.exists() or proc.poll() is not None, 300, first_marker.name, interval=0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    assert not (run_dir / "manifest.json").exists(), "the run finished before it could be interrupted"
    complete = sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step-*/checkpoint.json"))
    assert complete and complete[-1] < STEPS

    resumed = subprocess.run(trainer_cmd(config_for("resumed")), capture_output=True, text=True, timeout=600,
                             env=env, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {complete[-1]} " in resumed.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["step"] == STEPS and summary["totalSteps"] == STEPS
    assert summary["artifacts"]["location"] == str(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS + 1)), "metrics.jsonl has each step exactly once"

    reference = subprocess.run(trainer_cmd(config_for("reference")), capture_output=True, text=True, timeout=600,
                               env=env, cwd=REPO)
    assert reference.returncode == 0, reference.stderr
    assert "resuming" not in reference.stderr
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "tiny" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    # Same seeded data order, restored optimizer/scheduler/RNG and the same CPU kernels: identical.
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # and it evaluates as the uninterrupted run does: the same answers, the same metrics
    reference_dir = tmp_path / "reference" / "tiny"
    assert (run_dir / "predictions.jsonl").read_text() == (reference_dir / "predictions.jsonl").read_text()
    evaluated, reference = (json.loads((d / "evaluation.json").read_text()) for d in (run_dir, reference_dir))
    assert evaluated.pop("seconds") > 0 and reference.pop("seconds") > 0
    assert evaluated == reference


@pytest.mark.parametrize(("quantization", "optimizer"), [("int8", "adamw_8bit"), ("int4", "paged_adamw_8bit")])
def test_resume_restores_quantized_runs_with_8bit_optimizers(
    quantization: str, optimizer: str, assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(assets, tmp_path / "out", quantization=quantization,
                         training={"maxSteps": 6, "checkpointEverySteps": 3, "optimizer": optimizer})
    run = tmp_path / "out" / "tiny"
    Trainer(config, Reporter(tmp_path / "m1.jsonl")).run()
    first = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    # Pretend the pod died after step 3's checkpoint: drop everything written later.
    shutil.rmtree(run / "checkpoints" / "step-6")
    (run / "manifest.json").unlink()
    with caplog.at_level("INFO", logger="kubetune_trainer.train"):
        Trainer(config, Reporter(tmp_path / "m2.jsonl")).run()
    assert "resuming from step 3 " in caplog.text
    second = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(assets: Path, tmp_path: Path) -> None:
    cfg = tiny_config(assets, tmp_path / "out", training={"maxSteps": STEPS, "batchSize": 4,
                                                           "checkpointEverySteps": 100, "evalEverySteps": 100})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    with (tmp_path / "stdout").open("w") as out, (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(trainer_cmd(config), stdout=out, stderr=err, env=env, cwd=REPO)
        try:
            # The first progress line after step 1 says the loop is running.
            wait_for(lambda: '"step":2,' in (tmp_path / "stdout").read_text() or proc.poll() is not None,
                     300, "step 2", interval=0.01)
            proc.send_signal(signal.SIGTERM)
        finally:
            proc.wait(timeout=120)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 143, stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 143 and 2 <= summary["step"] < STEPS
    step = summary["step"]
    assert f"stopped by SIGTERM at step {step}" in summary["error"]
    assert (tmp_path / "out" / "tiny" / "checkpoints" / f"step-{step}" / "checkpoint.json").is_file()
