"""Packed blocks train exactly as their samples would one by one: no attention across samples."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from kubetune_trainer import data
from kubetune_trainer import model as model_lib
from kubetune_trainer.report import Reporter
from kubetune_trainer.steps import target_tokens, token_losses
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer


def test_packed_sample_losses_equal_the_unpacked_ones(assets: Path) -> None:
    config = make_config(assets, "/unused", dataset={"maxLength": 64})
    cpu = torch.device("cpu")
    tokenizer = model_lib.load_tokenizer(assets / "backbone")
    model = model_lib.load_base(assets / "backbone", config, model_lib.resolve_precision("fp32", cpu), cpu).eval()
    examples = data.load_examples(assets / "data" / "validation.jsonl", config.dataset)
    samples = data.tokenize(examples, config.dataset, tokenizer)
    blocks = data.pack(samples, 64)
    assert len(blocks) < len(samples) and max(len(b.input_ids) for b in blocks) <= 64
    assert sum(target_tokens(b) for b in blocks) == sum(target_tokens(s) for s in samples)

    def losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **({"position_ids": batch["position_ids"]} if "position_ids" in batch else {})).logits
        return token_losses(logits, batch["labels"])

    packed = losses(data.collate(blocks, tokenizer.pad_token_id))
    got: list[float] = []
    for row, block in enumerate(blocks):
        assert block.position_ids is not None
        starts = [i for i, p in enumerate(block.position_ids) if p == 0] + [len(block.input_ids)]
        # token_losses()[t] is the loss of predicting token t + 1.
        got += [float(packed[row, a : b - 1].sum()) for a, b in itertools.pairwise(starts)]
    want = [float(losses(data.collate([s], tokenizer.pad_token_id)).sum()) for s in samples]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_training_with_packing_lowers_eval_loss(assets: Path, tmp_path: Path) -> None:
    config = make_config(assets, tmp_path / "out", dataset={"maxLength": 64},
                         training={"maxSteps": 12, "batchSize": 4, "packing": True, "evalEverySteps": 12})
    trainer = Trainer(config, Reporter(tmp_path / "metrics.jsonl"))
    trainer.run()
    evals = [e["evalLoss"] for e in trainer.progress.events if e["evalLoss"] is not None]
    assert evals[-1] < evals[0] - 0.1, evals
