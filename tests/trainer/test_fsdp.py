"""distribution.strategy fsdp: two processes under torchrun (FSDP2 over gloo on the CPU) shard the
model; the outputs and checkpoints are the ones DDP writes, and a killed run resumes exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import kill_rank_one_after_a_checkpoint, run_env, torchrun, write_config
from test_loss_normalisation import TOLERANCE, adapter, exact_training, relative_difference, write_uneven_dataset

from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.errors import InvalidInput
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import REPO, make_config, tiny_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

FSDP = {"strategy": "fsdp"}


def run(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(torchrun(config), capture_output=True, text=True, timeout=600, env=run_env(tmp_path),
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_two_sharded_processes_train_and_publish_one_manifest(quantization: str, assets: Path,
                                                              tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", tiny_config(
        assets, tmp_path / "out", quantization=quantization, distribution=FSDP,
        training={"maxSteps": 6, "batchSize": 4, "checkpointEverySteps": 3, "evalEverySteps": 3},
    ))
    done = run(config, tmp_path)
    for rank in (0, 1):
        assert f"[rank {rank}] kubetune_trainer.distributed: fsdp: 2 decoder layers" in done.stderr
    run_dir = tmp_path / "out" / "tiny"
    manifest = verify_manifest(str(run_dir))
    assert {"adapter/adapter_model.safetensors", "predictions.jsonl"} <= {f["path"] for f in manifest["files"]}
    assert [p.name for p in run_dir.glob("manifest.json")] == ["manifest.json"]
    progress = [json.loads(line) for line in done.stdout.splitlines() if '"type":"progress"' in line]
    assert [e["step"] for e in progress] == list(range(7))
    assert sum('"type":"summary"' in line for line in done.stdout.splitlines()) == 1
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["step"] == 6 and summary["artifacts"]["location"] == str(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3", "step-6"]
    # The published adapter and the checkpoint hold whole tensors, as an unsharded run writes them.
    published = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert published and all(".lora_A." in name or ".lora_B." in name for name in published)
    assert all(t.shape[0] == 8 or t.shape[1] == 8 for t in published.values())  # lora.r 8, not a shard of it
    trained = load_file(str(run_dir / "checkpoints" / "step-6" / "trainable.safetensors"))
    assert {n.replace(".default", "") for n in trained} == set(published)
    optimizer = torch.load(run_dir / "checkpoints" / "step-6" / "optimizer.pt", weights_only=True)
    assert sorted(optimizer["state"]) == list(range(len(trained)))
    assert optimizer["param_groups"][0]["params"] == list(range(len(trained)))
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and all(p["tuned"] and p["base"] for p in predictions)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_sharded_training_equals_ddp(quantization: str, assets: Path, tmp_path: Path) -> None:
    # 90 samples in global batches of 16: each epoch's last step leaves rank 1 without samples in
    # its second micro-batch; 12 validation samples in batches of 4 give rank 1 one batch less.
    # int4: the 4-bit weights, sharded and gathered, compute what the unsharded ones do.
    write_uneven_dataset(tmp_path / "data" / "train.jsonl", 90, seed=0)
    write_uneven_dataset(tmp_path / "data" / "validation.jsonl", 12, seed=1)
    sections = exact_training(assets, tmp_path / "data", batchSize=4, gradientAccumulation=2)
    sections["quantization"] = quantization
    for name, strategy in (("ddp", "ddp"), ("fsdp", "fsdp")):
        run(write_config(tmp_path / f"{name}.yaml", tiny_config(
            assets, tmp_path / name, distribution={"strategy": strategy}, **sections)), tmp_path)
    assert relative_difference(adapter(tmp_path / "ddp"), adapter(tmp_path / "fsdp")) < TOLERANCE
    configs = [json.loads((tmp_path / name / "tiny" / "adapter" / "adapter_config.json").read_text())
               for name in ("ddp", "fsdp")]
    for config in configs:  # peft writes a set: its order changes from process to process
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    # The reported losses agree too: the training loss of every step, and the evaluations (at step 0
    # and the end), which run an extra forward pass on rank 1 under fsdp that must not count.
    events = {name: [json.loads(line) for line in (tmp_path / name / "tiny" / "metrics.jsonl").read_text().splitlines()]
              for name in ("ddp", "fsdp")}
    for key in ("trainLoss", "evalLoss"):
        ddp, fsdp = ([e[key] for e in events[name] if e[key] is not None] for name in ("ddp", "fsdp"))
        assert len(ddp) == len(fsdp) and fsdp == pytest.approx(ddp, rel=1e-4), key


def test_killed_sharded_run_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    steps = 20

    def config_for(name: str) -> Path:
        # Dropout on and AdamW: the masks and the optimizer's moments must come back as they were.
        return write_config(tmp_path / f"{name}.yaml", tiny_config(
            assets, tmp_path / name, distribution=FSDP,
            training={"maxSteps": steps, "batchSize": 4, "checkpointEverySteps": 5, "evalEverySteps": 10},
            lora={"r": 4, "alpha": 8, "dropout": 0.1},
        ))

    run_dir = tmp_path / "resumed" / "tiny"
    complete = kill_rank_one_after_a_checkpoint(config_for("resumed"), run_dir, tmp_path, steps)

    resumed = run(config_for("resumed"), tmp_path)
    for rank in (0, 1):
        assert f"[rank {rank}] kubetune_trainer.train: resuming from step {complete[-1]} " in resumed.stderr
    steps_reported = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_reported == list(range(steps + 1))

    run(config_for("reference"), tmp_path)
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "tiny" / "adapter" / "adapter_model.safetensors"))
    # Gathering and re-sharding copy the fp32 weights and optimizer moments unchanged, the data
    # order and the dropout masks depend on the step and rank only, and gloo's reduce-scatter of
    # two ranks adds two values (the same sum in either order): bit-identical.
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_one_process_cannot_shard(assets: Path, tmp_path: Path) -> None:
    config = make_config(assets, tmp_path / "out", distribution=FSDP)
    with pytest.raises(InvalidInput, match=r"distribution\.strategy fsdp .* this run has one"):
        Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
