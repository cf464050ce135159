"""`kubetune estimate` on an s3:// backbone: config.json is read with the caller's credentials, the
weights are not downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.__main__ import main
from tests.support.trainer import MinioServer

pytestmark = pytest.mark.trainer
MODELS = Path(__file__).resolve().parents[1] / "unit" / "models"


def test_estimate_reads_only_config_json_from_a_private_bucket(
        private_minio: MinioServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    client = private_minio.client()
    client.fput_object("test", "models/big/config.json", str(MODELS / "llama-70b" / "config.json"))
    (tmp_path / "weights").write_bytes(b"\0" * 4096)
    client.fput_object("test", "models/big/model-00001-of-00001.safetensors", str(tmp_path / "weights"))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"source": "s3://test/models/big/"},
        "dataset": {"train": "s3://test/data/train.jsonl", "maxLength": 2048},
        "training": {"batchSize": 1, "optimizer": "paged_adamw_8bit"},
        "quantization": "int4",
        "output": {"location": str(tmp_path / "out")},
        "storage": {"endpoint": private_minio.endpoint, "insecure": True},
    }))

    assert main(["estimate", "-f", str(config), "--gpu-memory", "24Gi", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["parameters"] == 70553706496
    cached = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert "config.json" in cached and not any(name.endswith(".safetensors") for name in cached)
