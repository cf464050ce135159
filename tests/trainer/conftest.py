"""Shared assets for the trainer tests: a tiny backbone and dataset, built once, no downloads; and a
private MinIO server that a test may stop and restart (the cluster's shared one must keep running)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import tiny
from tests.support.trainer import MinioServer, minio_binary


@pytest.fixture(scope="session")
def minio_server_binary() -> Path:
    return minio_binary()


@pytest.fixture
def private_minio(minio_server_binary: Path, tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[MinioServer]:
    """A running MinIO server for this test alone, its credentials in AWS_* and a bucket ``test``."""
    from minio import Minio

    server = MinioServer(minio_server_binary, tmp_path_factory.mktemp("minio"))
    server.start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
              secure=False).make_bucket("test")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``backbone/``, ``data/train.jsonl`` (128 rows) and ``data/validation.jsonl`` (16 rows)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny.build_tiny_backbone(root / "backbone")
    tiny.write_dataset(root / "data" / "train.jsonl", 128, seed=0)
    tiny.write_dataset(root / "data" / "validation.jsonl", 16, seed=1)
    return root


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private download cache and no reporting or termination message from the host."""
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("KUBETUNE_REPORT_URL", "KUBETUNE_REPORT_TOKEN", "KUBETUNE_TERMINATION_LOG"):
        monkeypatch.delenv(name, raising=False)
    yield
