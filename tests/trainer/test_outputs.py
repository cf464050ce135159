"""Published outputs: model card, curves, predictions, merged model, full fine-tune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer import data
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer


def test_merged_model_computes_what_the_adapter_model_computes(assets: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = make_config(assets, tmp_path / "out", training={"maxSteps": 6, "gradientCheckpointing": True},
                         output={"mergeAdapter": True})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    run = tmp_path / "out" / "tiny"
    assert result.summary["artifacts"]["merged"] == f"{run}/merged"
    files = {f["path"] for f in verify_manifest(str(run))["files"]}
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(assets / "backbone")
    # A complete Hugging Face model directory, checked by the trainer against base + adapter.
    assert {"merged/model.safetensors", "merged/config.json", "merged/generation_config.json",
            "merged/tokenizer.json", "merged/tokenizer_config.json"} <= files
    check = result.summary["artifacts"]["mergeCheck"]
    assert check == "greedy answers equal base + adapter on 3 of 3 prompts (float32)"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(run / "merged")).chat_template == result.tokenizer.chat_template

    samples = data.tokenize(data.load_examples(assets / "data" / "validation.jsonl", config.dataset),
                            config.dataset, result.tokenizer)
    batch = data.collate(samples[:4], result.tokenizer.pad_token_id)
    merged: Any = AutoModelForCausalLM.from_pretrained(str(run / "merged"))
    merged.eval()
    with torch.no_grad():
        want = result.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_an_int4_run_merges_into_the_unquantized_backbone_in_the_chosen_precision(assets: Path,
                                                                                  tmp_path: Path) -> None:
    """The merge dequantizes: the backbone is loaded afresh in output.mergePrecision, the adapter
    merged into it, and the directory loads with transformers alone, its answers base + adapter's."""
    from transformers import AutoModelForCausalLM

    config = make_config(assets, tmp_path / "out", quantization="int4", training={"maxSteps": 3},
                         output={"mergeAdapter": True, "mergePrecision": "bf16"})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    run = tmp_path / "out" / "tiny"
    verify_manifest(str(run))
    merged: Any = AutoModelForCausalLM.from_pretrained(str(run / "merged"))
    assert merged.dtype == torch.bfloat16 and not getattr(merged, "is_loaded_in_4bit", False)
    assert "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())
    assert result.summary["artifacts"]["mergeCheck"].endswith("of 3 prompts (bfloat16)")


def test_full_fine_tune_with_packing_publishes_the_model_and_a_model_card(assets: Path, tmp_path: Path) -> None:
    config = make_config(
        assets, tmp_path / "out",
        lora={"enabled": False},
        training={"maxSteps": 6, "packing": True, "learningRate": 0.001},
    )
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    run = tmp_path / "out" / "tiny"
    artifacts = result.summary["artifacts"]
    assert artifacts["adapter"] is None and artifacts["merged"] == f"{run}/model"
    manifest = verify_manifest(str(run))
    files = {f["path"] for f in manifest["files"]}
    assert {"model/model.safetensors", "README.md", "loss.png", "predictions.jsonl", "trainer_config.json",
            "metrics.jsonl"} <= files
    assert artifacts["files"] == len(files) and artifacts["totalBytes"] == manifest["totalBytes"]

    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run / "README.md").read_text()
    assert str(assets / "backbone") in card and "evalLoss" in card and "LoRA: off" in card
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    # a full fine-tune has no backbone to compare with: tuned answers only
    assert len(predictions) == 16 and set(predictions[0]) == {"prompt", "reference", "tuned", "scores"}
    assert json.loads((run / "trainer_config.json").read_text()) == config.model_dump(by_alias=True, mode="json")


@pytest.mark.parametrize(
    ("training", "expected"),
    [({"maxSteps": 7}, 7), ({"epochs": 2.0}, 20), ({"epochs": 0.5, "gradientAccumulation": 2}, 3)],
)
def test_total_steps_from_max_steps_or_epochs(assets: Path, training: dict[str, object], expected: int) -> None:
    from kubetune_trainer.steps import total_steps

    overrides: dict[str, object] = {"maxSteps": None, **training}
    # 80 samples, batch size 8: 10 steps per epoch without gradient accumulation.
    assert total_steps(make_config(assets, "/unused", training=overrides), train_samples=80) == expected


def test_validation_split_and_gradient_accumulation(assets: Path, tmp_path: Path) -> None:
    config = make_config(assets, tmp_path / "out", training={"maxSteps": 4, "gradientAccumulation": 2},
                         dataset={"validation": None, "validationSplit": 0.25})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    assert result.summary["step"] == 4
    # 128 rows: 32 held out, 96 train = 12 micro-batches of 8; 4 steps x 2 micro-batches = 2/3 epoch.
    assert result.summary["epoch"] == pytest.approx(8 / 12, abs=1e-3)
    card = (tmp_path / "out" / "tiny" / "README.md").read_text()
    assert "held out from train` (32 samples)" in card and "(96 samples)" in card


def test_a_merged_model_that_lost_the_adapter_is_reported(assets: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The check after writing compares answers, so a merge that drops the adapter (here: peft's
    unload, which removes the LoRA layers without merging them) shows in status.artifacts.mergeCheck."""
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    config = make_config(assets, tmp_path / "out", output={"mergeAdapter": True})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    check = result.summary["artifacts"]["mergeCheck"]
    assert check.startswith("greedy answers equal base + adapter on ") and " 3 of 3 " not in check, check
