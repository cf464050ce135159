"""The data's statistics before the model loads (status.dataset, logs, model card, samples.txt) and
`kubetune estimate --data`, checked against counts made independently from the file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devcluster import tiny
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config, tiny_config

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
MAX_LENGTH = 16
CHAT_TOKENS = 4  # <s> <|user|> ... <|assistant|> ... </s> with the tiny backbone's chat template


def write_rows(path: Path) -> list[dict[str, str]]:
    """The tiny dataset, plus rows long enough to be truncated at MAX_LENGTH (and one with no answer
    token left)."""
    rows = tiny.make_rows(60, seed=3)
    rows += [{"prompt": "reverse : " + " ".join(tiny.WORDS[: 3 + 2 * i]), "answer": " ".join(tiny.WORDS[:3])}
             for i in range(5)]
    rows.append({"prompt": " ".join(["red"] * 20), "answer": "blue"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def expected(rows: list[dict[str, str]]) -> dict[str, int]:
    """Counts from the file alone: the word-level tokenizer makes one token per word."""
    lengths = [len(r["prompt"].split()) + len(r["answer"].split()) + CHAT_TOKENS for r in rows]
    prompts = [len(r["prompt"].split()) + 3 for r in rows]  # <s> <|user|> prompt <|assistant|>
    dropped = sum(p >= MAX_LENGTH for p in prompts)
    return {"samples": len(rows) - dropped, "dropped": dropped, "truncated": sum(n > MAX_LENGTH for n in lengths),
            "tokensP50": int(np.percentile(lengths, 50, method="lower")),
            "tokensP95": int(np.percentile(lengths, 95, method="inverted_cdf")), "tokensMax": max(lengths),
            "epochTokens": sum(min(n, MAX_LENGTH) for n, p in zip(lengths, prompts, strict=True) if p < MAX_LENGTH)}


def test_the_statistics_match_the_file_and_reach_the_first_report_the_card_and_samples_txt(
        assets: Path, tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "train.jsonl")
    want = expected(rows)
    assert want["truncated"] >= 3 and want["dropped"] >= 1
    config = make_config(assets, tmp_path / "out", dataset={"train": str(tmp_path / "train.jsonl"),
                                                             "maxLength": MAX_LENGTH},
                         training={"maxSteps": 12, "batchSize": 4, "evalEverySteps": 12, "checkpointEverySteps": 12})
    result = Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    stats = result.summary["dataset"]
    assert {k: stats[k] for k in want} == want
    per_epoch = math.ceil(want["samples"] / 4)
    assert (stats["stepsPerEpoch"], stats["totalSteps"]) == (per_epoch, 12)
    assert stats["totalTokens"] == round(want["epochTokens"] * 12 / per_epoch)
    assert stats["validationSamples"] == 16 and stats["gpuHours"] == 0 and stats["estimatedSeconds"] > 0

    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["step"] == 0 and events[0]["dataset"]["truncated"] == want["truncated"]
    assert "estimatedSeconds" not in events[0]["dataset"]
    estimated = [e for e in events if "estimatedSeconds" in (e.get("dataset") or {})]
    assert [e["step"] for e in estimated] == [5]
    assert sum("dataset" in e for e in events) == 2

    run = tmp_path / "out" / "tiny"
    assert "samples.txt" in {f["path"] for f in verify_manifest(str(run))["files"]}
    samples = (run / "samples.txt").read_text()
    first = rows[0]
    assert f"[masked]<s> <|user|> {first['prompt']} <|assistant|>[/masked] {first['answer']} </s>" in samples
    assert f"{want['truncated']} truncated, {want['dropped']} dropped" in (run / "README.md").read_text()


def estimate_data(config: dict[str, Any], data_file: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`kubetune estimate -f CONFIG --data FILE --json` for ``config``."""
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "kubetune", "estimate", "-f", str(tmp_path / "cfg.json"),
                           "--data", str(data_file), "--json"], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_kubetune_estimate_counts_a_data_file_as_the_trainer_does(assets: Path, tmp_path: Path) -> None:
    rows = write_rows(tmp_path / "train.jsonl")
    config = tiny_config(assets, tmp_path / "out", dataset={"train": str(tmp_path / "train.jsonl"),
                                                            "maxLength": MAX_LENGTH},
                         training={"batchSize": 4})
    del config["training"]["maxSteps"]
    config["training"]["epochs"] = 3
    done = estimate_data(config, tmp_path / "train.jsonl", tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)["dataset"]
    want = expected(rows)
    assert {k: stats[k] for k in want} == want
    assert stats["totalSteps"] == 3 * math.ceil(want["samples"] / 4)

    missing = estimate_data(config, tmp_path / "nope.jsonl", tmp_path)
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr


def test_kubetune_estimate_counts_preference_pairs_as_the_trainer_does(assets: Path, tmp_path: Path) -> None:
    from devcluster import tiny
    from kubetune_contract.config import TrainerConfig
    from kubetune_trainer import data
    from kubetune_trainer import model as model_lib

    long_prompt = "reverse : " + " ".join(["red", "cat", "dog"] * 6)
    rows = [*tiny.make_preference_rows(39, seed=0), {"prompt": long_prompt, "chosen": "dog", "rejected": "red"},
            {"prompt": "capital of peru ?", "chosen": "lima", "rejected": "lima"}]
    tiny.write_rows(tmp_path / "pairs.jsonl", rows)
    config = tiny_config(assets, tmp_path / "out", dataset={"train": str(tmp_path / "pairs.jsonl"), "maxLength": 16},
                         training={"batchSize": 4, "method": "dpo"})
    done = estimate_data(config, tmp_path / "pairs.jsonl", tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)["dataset"]
    run = TrainerConfig.model_validate(config)
    tokenizer = model_lib.load_tokenizer(assets / "backbone", False)
    pairs = data.tokenize_pairs(data.load_pairs(tmp_path / "pairs.jsonl", run.dataset).examples, run.dataset,
                                tokenizer)
    assert stats["samples"] == 40 and stats["skipped"] == 1
    assert stats["truncated"] == pairs.truncated > 0
    assert stats["epochTokens"] == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs.samples)
    assert stats["tokensMax"] == max(pairs.lengths) > 16
