"""Through a real MinIO: data and backbone read from s3://, outputs written there, manifest last."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from kubetune_contract.config import StorageSpec
from kubetune_trainer import artifacts
from kubetune_trainer.artifacts import IncompleteRun, S3Store, verify_manifest
from kubetune_trainer.errors import SourceUnavailable, StoreUnavailable
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import MinioServer, make_config

pytestmark = pytest.mark.trainer


@pytest.fixture
def bucket(minio_env: dict[str, str], assets: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh bucket holding the tiny backbone under ``models/tiny/`` and the data under ``data/``."""
    from minio import Minio

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_env["MINIO_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_env["MINIO_SECRET_KEY"])
    client = Minio(minio_env["MINIO_ENDPOINT"], access_key=minio_env["MINIO_ACCESS_KEY"],
                   secret_key=minio_env["MINIO_SECRET_KEY"], secure=False)
    name = f"trainer-{secrets.token_hex(4)}"
    client.make_bucket(name)
    for path in (assets / "backbone").iterdir():
        client.fput_object(name, f"models/tiny/{path.name}", str(path))
    for path in (assets / "data").iterdir():
        client.fput_object(name, f"data/{path.name}", str(path))
    storage = {"endpoint": minio_env["MINIO_ENDPOINT"], "insecure": True}
    return {"name": name, "client": client, "storage": storage}


def s3_config(assets: Path, bucket: dict[str, Any], steps: int = 12) -> Any:
    name = bucket["name"]
    return make_config(
        assets, f"s3://{name}/runs",
        model={"source": f"s3://{name}/models/tiny"},
        dataset={"train": f"s3://{name}/data/train.jsonl", "validation": f"s3://{name}/data/validation.jsonl"},
        training={"maxSteps": steps, "checkpointEverySteps": 5, "evalEverySteps": 5},
        storage=bucket["storage"],
    )


def test_s3_data_in_s3_artifacts_out_manifest_last(
    assets: Path, bucket: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads: list[str] = []
    original = S3Store.put_file

    def recording_put(self: S3Store, local: Path, key: str) -> None:
        original(self, local, key)
        uploads.append(key)

    monkeypatch.setattr(S3Store, "put_file", recording_put)
    result = Trainer(s3_config(assets, bucket), Reporter(tmp_path / "metrics.jsonl")).run()

    location = f"s3://{bucket['name']}/runs/tiny"
    assert result.summary["artifacts"]["location"] == location
    assert result.summary["artifacts"]["manifest"] == f"{location}/manifest.json"
    assert uploads[-1] == "manifest.json" and uploads.count("manifest.json") == 1
    manifest = verify_manifest(location, StorageSpec.model_validate(bucket["storage"]))
    published = {f["path"] for f in manifest["files"]}
    assert {"adapter/adapter_model.safetensors", "metrics.jsonl", "README.md", "loss.png",
            "predictions.jsonl", "trainer_config.json"} <= published
    final_uploads = uploads[uploads.index(sorted(published)[0]):]
    assert set(final_uploads[:-1]) == published, "every listed file was uploaded before the manifest"
    assert result.summary["artifacts"]["files"] == len(published)
    # Checkpoint 12 (final) and 10 kept; 5 pruned (keepCheckpoints=2).
    store = S3Store(location, StorageSpec.model_validate(bucket["storage"]))
    markers = [k for k in store.list("checkpoints/") if k.endswith("checkpoint.json")]
    assert markers == ["checkpoints/step-10/checkpoint.json", "checkpoints/step-12/checkpoint.json"]


def test_store_outage_while_publishing_leaves_no_manifest(
    assets: Path, private_minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_STORE_RETRY_SECONDS", "1")
    original = S3Store.put_file

    def stop_server_before_loss_png(self: S3Store, local: Path, key: str) -> None:
        # Only the timing is arranged here: the server process really stops, the upload really fails.
        if key == "loss.png":
            private_minio.stop()
        original(self, local, key)

    monkeypatch.setattr(S3Store, "put_file", stop_server_before_loss_png)
    storage = {"endpoint": private_minio.endpoint, "insecure": True}
    config = make_config(assets, "s3://test/runs", training={"maxSteps": 5, "checkpointEverySteps": 5},
                         storage=storage)
    with pytest.raises(StoreUnavailable, match=r"upload s3://test/runs/tiny/loss\.png") as err:
        Trainer(config, Reporter(tmp_path / "metrics.jsonl")).run()
    assert err.value.exit_code == 5

    private_minio.start()
    location = "s3://test/runs/tiny"
    store = S3Store(location, StorageSpec.model_validate(storage))
    assert "adapter/adapter_model.safetensors" in store.list("adapter/")
    assert store.list("loss.png") == [] and store.list(artifacts.MANIFEST) == []
    with pytest.raises(IncompleteRun, match=r"no manifest\.json"):
        verify_manifest(location, StorageSpec.model_validate(storage))


def test_missing_data_object_is_a_source_error(assets: Path, bucket: dict[str, Any]) -> None:
    config = s3_config(assets, bucket)
    config.dataset.train = f"s3://{bucket['name']}/data/nope.jsonl"
    with pytest.raises(SourceUnavailable, match=r"nope\.jsonl") as err:
        Trainer(config).run()
    assert err.value.exit_code == 4


def test_missing_output_bucket_is_a_source_error(assets: Path, bucket: dict[str, Any]) -> None:
    config = s3_config(assets, bucket)
    config.output.location = f"s3://{bucket['name']}-missing/runs"
    with pytest.raises(SourceUnavailable, match=rf"bucket '{bucket['name']}-missing' does not exist") as err:
        Trainer(config).run()
    assert err.value.exit_code == 4


def test_endpoint_from_s3_endpoint_env_and_downloads_are_cached(
    bucket: dict[str, Any], minio_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kubetune_trainer.sources import resolve

    monkeypatch.setenv("S3_ENDPOINT", f"http://{minio_env['MINIO_ENDPOINT']}")
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    storage = StorageSpec()  # no endpoint: S3_ENDPOINT, and its http:// scheme means plain HTTP
    model_dir = resolve(f"s3://{bucket['name']}/models/tiny", storage, directory=True)
    assert model_dir.is_relative_to(tmp_path / "cache")
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="kubetune_trainer.sources"):
        assert resolve(f"s3://{bucket['name']}/models/tiny", storage, directory=True) == model_dir
    assert "cached" in caplog.text and "downloaded s3://" not in caplog.text
