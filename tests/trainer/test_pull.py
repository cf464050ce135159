"""Pulling a published run (``kubetune pull``'s download, artifacts.pull_run) from a real MinIO: every
file checked against the manifest before the target appears; a file altered in the bucket is named
and nothing is left behind."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_contract.config import StorageSpec
from kubetune_trainer.artifacts import IncompleteRun, S3Store, publish, pull_run
from tests.support.trainer import MinioServer

pytestmark = pytest.mark.trainer

FILES = {
    "adapter/adapter_model.safetensors": b"\x00weights" * 40_000,
    "adapter/adapter_config.json": b'{"r": 8}',
    "README.md": b"# run\n",
    "metrics.jsonl": b'{"step": 1}\n',
}


@pytest.fixture(scope="module")
def minio(minio_server_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """One MinIO server for this module (nothing here stops it), with a bucket ``test``."""
    from minio import Minio

    server = MinioServer(minio_server_binary, tmp_path_factory.mktemp("minio"))
    server.start()
    try:
        Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
              secure=False).make_bucket("test")
        yield server
    finally:
        server.stop()


@pytest.fixture
def published(minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, StorageSpec]:
    """A run published under a prefix of its own; its store's credentials in AWS_*."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio.secret_key)
    staging = tmp_path / "staging"
    for path, content in FILES.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(content)
    storage = StorageSpec(endpoint=minio.endpoint, insecure=True)
    location = f"s3://test/runs/ns/{tmp_path.name}"
    publish(staging, S3Store(location, storage), lineage={"configSha256": "c" * 64})
    return location, storage


def test_a_pulled_run_is_the_published_one_with_its_lineage(published: tuple[str, StorageSpec],
                                                             tmp_path: Path) -> None:
    location, storage = published
    told: list[tuple[int, int]] = []
    arrived: list[int] = []

    def progress(files: int, total: int):  # type: ignore[no-untyped-def]
        told.append((files, total))
        return arrived.append

    manifest = pull_run(location, tmp_path / "pulled", storage, progress=progress)
    for path, content in FILES.items():
        assert (tmp_path / "pulled" / path).read_bytes() == content
    assert manifest["lineage"] == {"configSha256": "c" * 64}
    assert (tmp_path / "pulled" / "manifest.json").is_file()
    assert told == [(len(FILES), sum(len(c) for c in FILES.values()))] and sum(arrived) == told[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pulled", "staging"], "no partial directory is left"


def test_only_the_named_parts(published: tuple[str, StorageSpec], tmp_path: Path) -> None:
    location, storage = published
    pull_run(location, tmp_path / "adapter-only", storage, include=("adapter",))
    got = sorted(p.relative_to(tmp_path / "adapter-only").as_posix()
                 for p in (tmp_path / "adapter-only").rglob("*") if p.is_file())
    assert got == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "manifest.json"]
    with pytest.raises(IncompleteRun, match=r"no file of manifest\.json is under merged"):
        pull_run(location, tmp_path / "none", storage, include=("merged",))
    assert not (tmp_path / "none").exists()


def test_a_file_altered_in_the_bucket_is_refused_by_name_and_nothing_is_written(
    published: tuple[str, StorageSpec], tmp_path: Path
) -> None:
    location, storage = published
    altered = tmp_path / "altered"
    altered.write_bytes(FILES["adapter/adapter_model.safetensors"][:-1] + b"!")  # same size, one byte off
    S3Store(location, storage).put_file(altered, "adapter/adapter_model.safetensors")
    with pytest.raises(IncompleteRun, match=rf"{location}/adapter/adapter_model\.safetensors has size "
                                            r"320000 sha256 [0-9a-f]{64}, manifest\.json says 320000"):
        pull_run(location, tmp_path / "pulled", storage)
    assert not (tmp_path / "pulled").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["altered", "staging"], "no partial directory is left"


def test_an_existing_directory_with_files_is_never_written_into(published: tuple[str, StorageSpec],
                                                                tmp_path: Path) -> None:
    location, storage = published
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        pull_run(location, tmp_path / "mine", storage)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    pull_run(location, tmp_path / "empty", storage)
    assert (tmp_path / "empty" / "README.md").read_bytes() == FILES["README.md"]


def test_a_pinned_pull_takes_that_publication_only(published: tuple[str, StorageSpec], tmp_path: Path) -> None:
    """`python -m kubetune_trainer pull` (a serving init container): the manifest's sha256 pins every file;
    the same run published again under the same location is refused (exit 3) and nothing is written."""
    location, storage = published
    first = pull_run(location, tmp_path / "first", storage)
    assert first["lineage"]
    pin = hashlib.sha256((tmp_path / "first" / "manifest.json").read_bytes()).hexdigest()
    command = [sys.executable, "-m", "kubetune_trainer", "pull", "--location", location, "--endpoint",
               str(storage.endpoint), "--insecure", "--manifest-sha256", f"sha256:{pin}", "--include", "adapter"]
    done = subprocess.run([*command, "--to", str(tmp_path / "pinned")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "verified 2 files" in done.stderr
    assert (tmp_path / "pinned" / "adapter" / "adapter_model.safetensors").read_bytes() == FILES[
        "adapter/adapter_model.safetensors"]

    again = tmp_path / "again"
    again.mkdir()
    (again / "README.md").write_bytes(b"# run, published again\n")
    publish(again, S3Store(location, storage))
    refused = subprocess.run([*command, "--to", str(tmp_path / "refused")], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 3
    assert "manifest.json has sha256" in refused.stderr and f"pinned sha256:{pin}" in refused.stderr
    assert not (tmp_path / "refused").exists()
