"""A run's lineage (docs/artifacts.md): deterministic, in manifest.json, the model card and the summary;
each digest follows its content and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune_contract import __version__
from kubetune_contract.events import now
from kubetune_trainer import data, lineage
from kubetune_trainer.artifacts import verify_manifest
from kubetune_trainer.report import Reporter, encode_summary
from kubetune_trainer.sources import sha256_of
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer
TIMES = ("startedAt", "finishedAt")


def run_lineage(assets: Path, out: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    monkeypatch.setenv(lineage.IMAGE_ENV, "registry.example/kubetune-trainer:1")
    config = make_config(assets, out, runName=name, training={"maxSteps": 2})
    result = Trainer(config, Reporter(out / f"{name}.jsonl")).run()
    manifest = verify_manifest(str(out / name))
    reported = result.summary["artifacts"]["lineage"]
    assert {k: v for k, v in reported.items() if v is not None} == manifest["lineage"]
    return manifest["lineage"], (out / name / "README.md").read_text()


def test_two_runs_of_the_same_inputs_have_the_same_lineage_but_for_the_times(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, card = run_lineage(assets, tmp_path / "a", "first", monkeypatch)
    second, _ = run_lineage(assets, tmp_path / "b", "second", monkeypatch)
    assert {k: v for k, v in first.items() if k not in TIMES} == {k: v for k, v in second.items() if k not in TIMES}
    assert first["startedAt"] <= first["finishedAt"]

    train = assets / "data" / "train.jsonl"
    assert first["data"][0] == {"role": "train", "uri": str(train), "bytes": train.stat().st_size,
                                "sha256": sha256_of(train)}
    assert first["data"][1]["role"] == "validation"
    assert first["modelSource"] == str(assets / "backbone")
    assert first["modelSha256"] == lineage.weights_sha256(assets / "backbone")
    assert first["image"] == "registry.example/kubetune-trainer:1" and first["version"] == __version__
    assert "## Lineage" in card and first["configSha256"] in card and first["data"][0]["sha256"] in card


def test_one_changed_byte_changes_the_data_digest_and_nothing_else(assets: Path, tmp_path: Path) -> None:
    copy = tmp_path / "train.jsonl"
    shutil.copyfile(assets / "data" / "train.jsonl", copy)
    config = make_config(assets, tmp_path / "out", dataset={"train": str(copy)})
    before = data.load_datasets(config).files
    text = copy.read_bytes()
    at = text.index(b'"answer": "') + len(b'"answer": "')
    copy.write_bytes(text[:at] + bytes([text[at] ^ 0x20]) + text[at + 1 :])  # one letter's case
    after = data.load_datasets(config).files
    assert before[0].sha256 != after[0].sha256 and before[0].bytes == after[0].bytes
    assert before[1] == after[1]


def test_the_config_digest_follows_what_is_trained_not_where_it_goes(assets: Path, tmp_path: Path) -> None:
    base = lineage.config_sha256(make_config(assets, tmp_path / "out"))
    assert lineage.config_sha256(make_config(assets, tmp_path / "elsewhere", runName="other")) == base
    assert lineage.config_sha256(make_config(assets, tmp_path / "out", training={"learningRate": 0.02})) != base


def test_the_weights_digest_is_of_their_content_wherever_they_lie(assets: Path, tmp_path: Path) -> None:
    copy = tmp_path / "backbone"
    shutil.copytree(assets / "backbone", copy)
    assert lineage.weights_sha256(copy) == lineage.weights_sha256(assets / "backbone")
    (copy / "tokenizer_config.json").write_text("{}")  # not a weight file
    assert lineage.weights_sha256(copy) == lineage.weights_sha256(assets / "backbone")
    weights = next(copy.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert lineage.weights_sha256(copy) != lineage.weights_sha256(assets / "backbone")


def test_a_hub_backbone_is_named_by_its_commit(assets: Path, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(assets / "backbone", snapshot)
    config = make_config(assets, tmp_path / "out", model={"source": "hf://org/tiny", "revision": "main"})
    found = lineage.lineage(config, snapshot, [], now())
    assert found.model_revision == commit and found.model_sha256 is None


def test_a_long_summary_keeps_the_lineage_digests() -> None:
    digest = "a" * 64
    summary = {"step": 1, "artifacts": {"location": "s3://b/r", "lineage": {
        "configSha256": digest, "data": [{"role": "train", "uri": "s3://b/" + "x" * 2000, "bytes": 1, "sha256": digest},
                                         {"role": "validation", "uri": "s3://b/" + "y" * 2000, "bytes": 1,
                                          "sha256": digest}]}}}
    encoded = json.loads(encode_summary(summary))
    kept = encoded["artifacts"]["lineage"]
    assert kept["configSha256"] == digest and [d["sha256"] for d in kept["data"]] == [digest, digest]
    assert all("uri" not in d for d in kept["data"])
