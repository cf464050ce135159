"""Training on the CPU through the real code paths: bf16/fp32 LoRA, int8 LoRA, int4 QLoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer import data
from kubetune_trainer import model as model_lib
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer

# Same weights, same kernels: the reloaded model computes the same function. The int8/int4 paths
# go through bitsandbytes' CPU kernels, whose fp16 casts allow a little more slack.
LOGIT_TOLERANCE = {"none": 1e-5, "int8": 1e-3, "int4": 1e-3}


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out.float()


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_training_lowers_eval_loss_and_adapter_reloads(
    quantization: str, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel

    # The quantized runs use gradient checkpointing, as QLoRA on a real card would.
    training = {"maxSteps": 32, "gradientCheckpointing": quantization != "none"}
    config = make_config(assets, tmp_path / "out", quantization=quantization, training=training)
    trainer = Trainer(config, Reporter(tmp_path / "metrics.jsonl"))
    result = trainer.run()

    events = [json.loads(line) for line in (tmp_path / "out" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["evalLoss"] is not None]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 32
    assert evals[-1]["evalLoss"] < evals[0]["evalLoss"] - 0.1, evals
    assert result.summary["step"] == 32
    assert result.summary["metrics"]["evalLoss"] == pytest.approx(evals[-1]["evalLoss"])
    verify_manifest(str(tmp_path / "out" / "tiny"))

    samples = data.tokenize(
        data.load_examples(assets / "data" / "validation.jsonl", config.dataset), config.dataset, result.tokenizer
    )
    batch = data.collate(samples[:4], result.tokenizer.pad_token_id)
    trained = logits(result.model.eval(), batch)

    precision = model_lib.resolve_precision("auto", torch.device("cpu"))
    base = model_lib.load_base(assets / "backbone", config, precision, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "tiny" / "adapter")).eval()
    assert torch.allclose(logits(reloaded, batch), trained, atol=LOGIT_TOLERANCE[quantization]), (
        (logits(reloaded, batch) - trained).abs().max()
    )
    base_only = logits(model_lib.load_base(assets / "backbone", config, precision, torch.device("cpu")), batch)
    assert not torch.allclose(base_only, trained, atol=1e-2), "the adapter changed nothing"
    assert '"type":"progress"' in capsys.readouterr().out
