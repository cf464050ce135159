"""The loss of an optimizer step is normalised by its target tokens, however the step is split."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from devcluster import tiny
from kubetune_trainer.report import Reporter
from kubetune_trainer.steps import DataOrder
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer

# fp32 on the CPU: the split only changes the order of float additions.
TOLERANCE = 1e-4


def write_uneven_dataset(path: Path, rows: int, seed: int) -> Path:
    """Answers of one word or of twenty: per-sample means weigh tokens very differently."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        length = 1 if i % 2 else 20
        answer = " ".join(rng.choice(tiny.WORDS) for _ in range(length))
        lines.append(json.dumps({"prompt": "reverse : " + " ".join(rng.sample(tiny.WORDS, 3)), "answer": answer}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def exact_training(assets: Path, data_dir: Path, **training: Any) -> dict[str, Any]:
    """Sections for a run whose result depends only on which samples each step sees."""
    return {
        "dataset": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                    "maxLength": 48},
        "training": {"maxSteps": 10, "optimizer": "sgd", "precision": "fp32", "learningRate": 0.05,
                     "evalEverySteps": 10, "checkpointEverySteps": 10, "seed": 3, **training},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": "none",
    }


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max|a - b| / max|a| over every tensor of two adapters."""
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return diff / max(float(a[k].abs().max()) for k in a)


def adapter(location: Path) -> dict[str, torch.Tensor]:
    return load_file(str(location / "tiny" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uneven")
    write_uneven_dataset(root / "train.jsonl", 96, seed=0)
    write_uneven_dataset(root / "validation.jsonl", 8, seed=1)
    return root


def test_gradient_accumulation_equals_one_larger_batch(assets: Path, uneven_data: Path, tmp_path: Path) -> None:
    large = make_config(assets, tmp_path / "large", **exact_training(assets, uneven_data, batchSize=8))
    split = make_config(assets, tmp_path / "split",
                        **exact_training(assets, uneven_data, batchSize=4, gradientAccumulation=2))
    Trainer(large, Reporter(tmp_path / "large.jsonl")).run()
    Trainer(split, Reporter(tmp_path / "split.jsonl")).run()
    assert relative_difference(adapter(tmp_path / "large"), adapter(tmp_path / "split")) < TOLERANCE
    # The reported loss is per target token of the step, so it agrees too.
    losses = [[json.loads(line)["trainLoss"] for line in (tmp_path / name).read_text().splitlines()][1:]
              for name in ("large.jsonl", "split.jsonl")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize(("batch_size", "accumulation", "world_size"), [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2)])
def test_each_step_trains_on_the_same_samples_however_it_is_split(
    batch_size: int, accumulation: int, world_size: int
) -> None:
    reference = DataOrder(45, 8, 1, 1, seed=5)
    order = DataOrder(45, batch_size, accumulation, world_size, seed=5)
    assert order.steps_per_epoch == reference.steps_per_epoch == 6
    for step in range(1, 13):  # two epochs; each ends with a short global batch of 5 samples
        chosen = order.step(step)
        parts = [order.micro_batch(chosen, k, r) for k in range(accumulation) for r in range(world_size)]
        assert sorted(i for part in parts for i in part) == sorted(chosen) == sorted(reference.step(step))
    assert sorted(order.step(1) + order.step(2) + order.step(3) + order.step(4) + order.step(5) + order.step(6)) \
        == list(range(45))
