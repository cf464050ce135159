"""Two processes under torchrun (DDP over gloo on the CPU): real processes, real process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_loss_normalisation import TOLERANCE, adapter, exact_training, relative_difference, write_uneven_dataset

from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.helpers import wait_for
from tests.support.trainer import REPO, make_config, tiny_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def torchrun(config: Path, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "kubetune_trainer", "--config", str(config)]


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"), "OMP_NUM_THREADS": "1"}



@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_two_processes_train_and_publish_one_manifest(quantization: str, assets: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", tiny_config(
        assets, tmp_path / "out", quantization=quantization,
        training={"maxSteps": 6, "batchSize": 4, "checkpointEverySteps": 3, "evalEverySteps": 3},
    ))
    done = subprocess.run(torchrun(config), capture_output=True, text=True, timeout=600, env=run_env(tmp_path),
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rank 0 of 2" in done.stderr and "rank 1 of 2" in done.stderr
    run = tmp_path / "out" / "tiny"
    manifest = verify_manifest(str(run))
    assert manifest["files"]
    assert [p.name for p in run.glob("manifest.json")] == ["manifest.json"]
    # Rank 0 alone reports: each step's progress line once, one summary.
    progress = [json.loads(line) for line in done.stdout.splitlines() if '"type":"progress"' in line]
    assert [e["step"] for e in progress] == list(range(7))
    assert sum('"type":"summary"' in line for line in done.stdout.splitlines()) == 1
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["step"] == 6 and summary["artifacts"]["location"] == str(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6"]


def test_two_processes_equal_one_process_with_the_global_batch(assets: Path, tmp_path: Path) -> None:
    write_uneven_dataset(tmp_path / "data" / "train.jsonl", 96, seed=0)
    write_uneven_dataset(tmp_path / "data" / "validation.jsonl", 8, seed=1)
    two = write_config(tmp_path / "two.yaml", tiny_config(
        assets, tmp_path / "two", **exact_training(assets, tmp_path / "data", batchSize=4)))
    done = subprocess.run(torchrun(two), capture_output=True, text=True, timeout=600, env=run_env(tmp_path),
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    one = make_config(assets, tmp_path / "one", **exact_training(assets, tmp_path / "data", batchSize=8))
    Trainer(one, Reporter(tmp_path / "one.jsonl")).run()
    assert relative_difference(adapter(tmp_path / "one"), adapter(tmp_path / "two")) < TOLERANCE


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def kill_rank_one_after_a_checkpoint(config: Path, run_dir: Path, tmp_path: Path, steps: int) -> list[int]:
    """Run ``config`` on two processes and SIGKILL rank 1 once the checkpoint of step 5 is complete;
    return the steps of the complete checkpoints the failed run left."""
    marker = run_dir / "checkpoints" / "step-5" / "checkpoint.json"
    with (tmp_path / "first.log").open("w") as log:
        launcher = subprocess.Popen(torchrun(config), stdout=subprocess.DEVNULL, stderr=log,
                                    env=run_env(tmp_path), cwd=REPO)
        try:
            wait_for(lambda: marker.exists() or launcher.poll() is not None, 300, marker.name, interval=0.05)
            workers = children(launcher.pid)
            assert len(workers) == 2, workers
            os.kill(workers[1], signal.SIGKILL)
            launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(timeout=60)
    assert launcher.returncode != 0, (tmp_path / "first.log").read_text()[-4000:]
    assert not (run_dir / "manifest.json").exists(), "the run finished before it could be interrupted"
    complete = sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step-*/checkpoint.json"))
    assert complete and complete[-1] < steps
    return complete


def test_killed_rank_fails_the_run_and_a_rerun_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    steps = 40

    def config_for(name: str) -> Path:
        # Dropout on: every rank must draw the masks the uninterrupted run drew.
        return write_config(tmp_path / f"{name}.yaml", tiny_config(
            assets, tmp_path / name,
            training={"maxSteps": steps, "batchSize": 4, "checkpointEverySteps": 5, "evalEverySteps": 20},
            lora={"r": 4, "alpha": 8, "dropout": 0.1},
        ))

    env = run_env(tmp_path)
    run_dir = tmp_path / "resumed" / "tiny"
    complete = kill_rank_one_after_a_checkpoint(config_for("resumed"), run_dir, tmp_path, steps)

    resumed = subprocess.run(torchrun(config_for("resumed")), capture_output=True, text=True, timeout=600,
                             env=env, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        assert f"[rank {rank}] kubetune_trainer.train: resuming from step {complete[-1]} " in resumed.stderr
    steps_reported = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_reported == list(range(steps + 1))

    reference = subprocess.run(torchrun(config_for("reference")), capture_output=True, text=True, timeout=600,
                               env=env, cwd=REPO)
    assert reference.returncode == 0, reference.stderr[-4000:]
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "tiny" / "adapter" / "adapter_model.safetensors"))
    # Same data order, restored weights and optimizer state, dropout seeded per step and rank, and
    # gloo's sum of two gradients is exact in its order: bit-identical.
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_launcher_keeps_the_exit_code_of_the_failed_worker(assets: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out",
                                                             dataset={"promptColumn": "question"}))
    plain = subprocess.run(torchrun(config), capture_output=True, text=True, timeout=300, env=run_env(tmp_path),
                           cwd=REPO)
    assert plain.returncode == 1, plain.stderr[-4000:]  # torchrun's own: the reason is lost
    launched = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", *torchrun(config)[3:]],
                              capture_output=True, text=True, timeout=300, env=run_env(tmp_path), cwd=REPO)
    assert launched.returncode == 3, launched.stderr[-4000:]
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 3 and "'question' (dataset.promptColumn) not found" in summary["error"]
    # Rank 1 waited for rank 0 to check the data: it fails with rank 0's reason and exit code, not
    # with a closed connection (exit 1) that the launcher could see first.
    assert "[rank 1] kubetune_trainer: rank 0 failed: " in launched.stderr, launched.stderr[-4000:]
    assert "Connection closed by peer" not in launched.stderr


def test_no_rank_ends_before_rank_zero_has_published(assets: Path, tmp_path: Path) -> None:
    """Over several pods, a pod whose ranks exit 0 completes its Job index for good: when rank 0
    fails while publishing, the other ranks must fail with it (so the Job restarts the group)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    from kubetune_trainer import train\n"
        "    def finish(self, *args, **kwargs):\n"
        "        raise RuntimeError('the store refused the manifest (planted failure)')\n"
        "    train.Trainer.finish = finish\n")
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out", training={"maxSteps": 4}))
    env = run_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", *torchrun(config)[3:]],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode != 0, done.stderr[-4000:]
    assert "planted failure" in done.stderr
    # rank 1 failed with it, and with its reason
    assert "[rank 1] kubetune_trainer: rank 0 failed: RuntimeError: the store refused" in done.stderr, \
        done.stderr[-4000:]
    assert not (tmp_path / "out" / "tiny" / "manifest.json").exists()


def test_every_rank_stops_with_the_store_outage_of_rank_zero(assets: Path, tmp_path: Path) -> None:
    """Rank 0 cannot write a checkpoint (the store is away): exit 5, which the Job ignores and
    retries. Rank 1 waits for that checkpoint; it must stop with code 5 too, or the launcher could
    see it end first, with 1, and the outage would use up backoffLimit."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    from kubetune_trainer import errors, train\n"
        "    def checkpoint(self, *args, **kwargs):\n"
        "        raise errors.StoreUnavailable('the store stopped answering (planted outage)')\n"
        "    train.Trainer.checkpoint = checkpoint\n")
    config = write_config(tmp_path / "cfg.yaml", tiny_config(assets, tmp_path / "out",
                                                             training={"maxSteps": 4, "checkpointEverySteps": 2}))
    env = run_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(inject), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", *torchrun(config)[3:]],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 5, done.stderr[-4000:]
    assert "[rank 1] kubetune_trainer: rank 0 failed: the store stopped answering (planted outage)" in done.stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 5 and summary["step"] == 2


def test_ranks_exchange_json_in_tensors_never_pickles(tmp_path: Path) -> None:
    """What ranks tell each other (a failure, evaluation answers) travels as JSON bytes in tensors:
    a peer on the rendezvous cannot make this process unpickle anything."""
    import re

    import torch.distributed as dist

    from kubetune_trainer.distributed import all_gather_json

    package = REPO / "trainer_image" / "kubetune_trainer"
    pickling = [p.name for p in package.rglob("*.py")
                if re.search(r"(all_gather|broadcast|gather|scatter)_object(_list)?\(", p.read_text())]
    assert pickling == []
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        value = [[[3, "moon star tree"], [0, "ünïcode ✓"]], None]
        assert all_gather_json(value, 1, torch.device("cpu")) == [value]
    finally:
        dist.destroy_process_group()
