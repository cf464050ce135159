"""Preference tuning on the tiny backbone: it learns the preferences, a full fine-tune's reference is
the backbone, and what holds for sft holds here: exact resume, 2 processes = 1, int8/int4, the
metrics in progress reports, metrics.jsonl, the summary and the model card."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, run_env, torchrun, write_config
from test_loss_normalisation import TOLERANCE, adapter, relative_difference

from devcluster import tiny
from kubetune_contract.config import DatasetSpec
from kubetune_trainer import data
from kubetune_trainer import model as model_lib
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.preference import Preference, pair_logps
from kubetune_trainer.report import Reporter
from kubetune_trainer.steps import forward_logits
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config, tiny_config

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.jsonl`` (128 pairs) and ``validation.jsonl`` (16 held-out pairs) of the tiny tasks:
    chosen is the right answer, rejected the words in their order or another country's capital."""
    root = tmp_path_factory.mktemp("pairs")
    tiny.write_rows(root / "train.jsonl", tiny.make_preference_rows(128, seed=0))
    tiny.write_rows(root / "validation.jsonl", tiny.make_preference_rows(16, seed=1))
    return root


def sections(pairs: Path, method: str = "dpo", **training: Any) -> dict[str, Any]:
    return {"dataset": {"train": str(pairs / "train.jsonl"), "validation": str(pairs / "validation.jsonl"),
                        "maxLength": 32},
            "training": {"method": method, "maxSteps": 6, "batchSize": 4, "checkpointEverySteps": 3,
                         "evalEverySteps": 3, "learningRate": 0.01, **training}}


def held_out_accuracy(model: Any, tokenizer: Any, pairs: Path, adapter_enabled: bool) -> float:
    """Fraction of held-out pairs whose chosen answer the model finds more likely than the rejected one."""
    spec = DatasetSpec(train="train.jsonl", max_length=32)
    tokenized = data.tokenize_pairs(data.load_pairs(pairs / "validation.jsonl", spec).examples, spec,
                                    tokenizer).samples
    batch = Preference.batch(tokenized, tokenizer.pad_token_id)
    cpu = torch.device("cpu")
    with torch.no_grad(), contextlib.nullcontext() if adapter_enabled else model.disable_adapter():
        got = pair_logps(forward_logits(model, batch, cpu, model_lib.resolve_precision("fp32", cpu)),
                         batch["labels"])
    return float((got.chosen > got.rejected).float().mean())


def starts_with_chosen(predictions: list[dict[str, Any]], key: str) -> float:
    """Fraction of greedy answers that begin with the chosen answer (the tiny backbone rarely stops)."""
    return sum(p[key].split()[: len(p["reference"].split())] == p["reference"].split()
               for p in predictions) / len(predictions)


@pytest.mark.slow
def test_dpo_learns_the_preferences(assets: Path, pairs: Path, tmp_path: Path) -> None:
    config = make_config(assets, tmp_path / "out", **sections(pairs, maxSteps=80, batchSize=8,
                                                               checkpointEverySteps=80, evalEverySteps=40))
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    base = held_out_accuracy(result.model, result.tokenizer, pairs, adapter_enabled=False)
    tuned = held_out_accuracy(result.model, result.tokenizer, pairs, adapter_enabled=True)
    assert base <= 0.6 and tuned >= 0.8, (base, tuned)
    run = tmp_path / "out" / "tiny"
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert starts_with_chosen(predictions, "tuned") >= starts_with_chosen(predictions, "base") + 0.25

    # the rewards: in every training report, at each evaluation, in the summary and the model card
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(e["rewards"]) >= {"chosen", "rejected", "margin", "accuracy"} for e in events[1:])
    evaluated = [e for e in events if "evalRewards" in e]
    assert [e["step"] for e in evaluated] == [0, 40, 80]
    assert evaluated[0]["evalRewards"]["margin"] == 0.0  # before training the policy is the reference
    final = result.summary["metrics"]["evalRewards"]
    assert final["accuracy"] >= 0.8 and final["margin"] > 0 and final["pairs"] == 16
    assert result.summary["metrics"]["rewards"]["pairs"] == 8
    card = (run / "README.md").read_text()
    assert "evalRewards.accuracy" in card and "method dpo" in card


def test_a_full_fine_tune_compares_with_the_backbone_as_loaded(assets: Path, pairs: Path, tmp_path: Path) -> None:
    config = make_config(assets, tmp_path / "out", **sections(pairs), lora={"enabled": False})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["evalRewards"]["margin"] == 0.0 and events[0]["evalRewards"]["chosen"] == 0.0
    assert result.summary["metrics"]["evalRewards"]["margin"] != 0.0


@pytest.mark.parametrize(("method", "quantization", "lora"), [
    ("dpo", "none", True), ("dpo", "none", False), ("ipo", "int8", True), ("simpo", "int4", True),
    ("orpo", "none", True)])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(method: str, quantization: str, lora: bool,
                                                            assets: Path, pairs: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(assets, tmp_path / "out", quantization=quantization, lora={"enabled": lora},
                         **sections(pairs, method))
    run = tmp_path / "out" / "tiny"
    Trainer(config, Reporter(tmp_path / "m1.jsonl")).run()
    verify_manifest(str(run))
    weights = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    first = load_file(str(run / weights))
    # The pod died after step 3's checkpoint: drop everything written later.
    shutil.rmtree(run / "checkpoints" / "step-6")
    (run / "manifest.json").unlink()
    with caplog.at_level("INFO", logger="kubetune_trainer.train"):
        resumed = Trainer(config, Reporter(tmp_path / "m2.jsonl")).run()
    assert "resuming from step 3 " in caplog.text
    verify_manifest(str(run))
    second = load_file(str(run / weights))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert resumed.summary["metrics"]["rewards"]["pairs"] == 4


@pytest.mark.slow
def test_two_processes_equal_one_process(assets: Path, pairs: Path, tmp_path: Path) -> None:
    exact = {"optimizer": "sgd", "precision": "fp32", "learningRate": 0.05, "maxSteps": 6, "seed": 3}
    two = write_config(tmp_path / "two.yaml", tiny_config(
        assets, tmp_path / "two", **sections(pairs, batchSize=2, **exact), lora={"r": 8, "alpha": 16, "dropout": 0.0}))
    done = subprocess.run(torchrun(two), capture_output=True, text=True, timeout=600, env=run_env(tmp_path), cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    one = make_config(assets, tmp_path / "one", **sections(pairs, batchSize=4, **exact),
                      lora={"r": 8, "alpha": 16, "dropout": 0.0})
    Trainer(one, Reporter(tmp_path / "one.jsonl")).run()
    assert relative_difference(adapter(tmp_path / "one"), adapter(tmp_path / "two")) < TOLERANCE


def test_a_conversation_dataset_trains_on_the_assistant_turns(assets: Path, tmp_path: Path) -> None:
    train = tiny.write_rows(tmp_path / "conversations.jsonl", tiny.make_conversation_rows(128, seed=0))
    validation = tiny.write_rows(tmp_path / "held.jsonl", tiny.make_conversation_rows(16, seed=1))
    config = make_config(assets, tmp_path / "out", dataset={
        "train": str(train), "validation": str(validation), "messagesColumn": "messages", "maxLength": 64},
        training={"maxSteps": 60, "evalEverySteps": 30, "checkpointEverySteps": 60, "learningRate": 0.005})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [e["evalLoss"] for e in events if e.get("evalLoss") is not None]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
    run = tmp_path / "out" / "tiny"
    # samples.txt shows the two assistant turns trained and the rest masked
    first = (run / "samples.txt").read_text().split("--- sample 2")[0]
    assert first.count("<|assistant|>[/masked]") == 2 and first.rstrip().endswith("</s>")
    # evaluation answers the last user turn of each held-out conversation
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    held = [json.loads(line)["messages"] for line in validation.read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [m[-1]["content"] for m in held]
    assert result.summary["evaluation"]["metrics"]["exactMatch"]["tuned"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sharded_preference_training_equals_ddp(lora: bool, assets: Path, pairs: Path, tmp_path: Path) -> None:
    """fsdp: the pairs' forward passes (and a full fine-tune's reference pass before the first step)
    are collective; the result is DDP's."""
    exact = {"optimizer": "sgd", "precision": "fp32", "learningRate": 0.05, "maxSteps": 4, "seed": 3,
             "checkpointEverySteps": 4, "evalEverySteps": 2}
    for strategy in ("ddp", "fsdp"):
        done = subprocess.run(torchrun(write_config(tmp_path / f"{strategy}.yaml", tiny_config(
            assets, tmp_path / strategy, **sections(pairs, batchSize=2, **exact), distribution={"strategy": strategy},
            lora={"enabled": lora, "r": 8, "alpha": 16, "dropout": 0.0}))), capture_output=True, text=True,
            timeout=600, env=run_env(tmp_path), cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
    weights = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    ddp, fsdp = (load_file(str(tmp_path / s / "tiny" / weights)) for s in ("ddp", "fsdp"))
    assert relative_difference(ddp, fsdp) < TOLERANCE
    events = {s: [json.loads(line) for line in (tmp_path / s / "tiny" / "metrics.jsonl").read_text().splitlines()]
              for s in ("ddp", "fsdp")}
    for key in ("rewards", "evalRewards"):
        got = {s: [e[key]["margin"] for e in events[s] if key in e] for s in ("ddp", "fsdp")}
        assert len(got["ddp"]) >= 2 and got["fsdp"] == pytest.approx(got["ddp"], rel=1e-4, abs=1e-6), key


def test_batch_size_auto_counts_pairs(assets: Path, pairs: Path, tmp_path: Path) -> None:
    config = make_config(assets, tmp_path / "out", **sections(pairs, batchSize="auto", globalBatchSize=6))
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    assert result.summary["metrics"]["rewards"]["pairs"] == 6
    assert result.summary["dataset"]["stepsPerEpoch"] == -(-128 // 6)
