"""The artifact store only reads, writes and deletes inside the run; a manifest cannot point outside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune_contract.config import StorageSpec
from kubetune_trainer.artifacts import (
    MANIFEST,
    IncompleteRun,
    LocalStore,
    S3Store,
    UnsafeKey,
    publish,
    verify_manifest,
)

pytestmark = pytest.mark.trainer


def entry(path: str, content: bytes) -> dict[str, object]:
    return {"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the run directory that a planted manifest aims at."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious\n")
    return path


@pytest.mark.parametrize("aim", ["relative", "nested", "absolute"])
def test_manifest_entry_outside_the_run_is_rejected_before_anything_is_touched(
    aim: str, victim: Path, tmp_path: Path
) -> None:
    run = tmp_path / "out" / "tiny"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_bytes(b"{}")
    # From the run directory and from the verifier's scratch directory alike, these reach the victim.
    path = {"relative": "../../victim.txt", "nested": "adapter/../../../victim.txt", "absolute": str(victim)}[aim]
    manifest = {"version": 1, "files": [entry("adapter/adapter_config.json", b"{}"),
                                         entry(path, victim.read_bytes())]}
    (run / MANIFEST).write_text(json.dumps(manifest))
    before = victim.stat()

    with pytest.raises(IncompleteRun, match=rf"manifest\.json entry {path!r} rejected"):
        verify_manifest(str(run))

    assert victim.read_bytes() == b"precious\n"
    assert victim.stat().st_mtime_ns == before.st_mtime_ns and victim.stat().st_ino == before.st_ino


@pytest.mark.parametrize("bad", ["not a list", [["adapter/x", 1, "0"]], [{"path": "a", "size": "1", "sha256": "0"}]],
                         ids=["files", "entry", "size"])
def test_malformed_manifest_is_an_incomplete_run(bad: object, tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps({"version": 1, "files": bad}))
    with pytest.raises(IncompleteRun, match=r"manifest\.json"):
        verify_manifest(str(tmp_path))


@pytest.mark.parametrize("key", ["../escaped.txt", "/escaped.txt", "a/../../escaped.txt", "a//b", "./a", ""])
def test_local_store_refuses_keys_outside_its_root(key: str, tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    source = tmp_path / "source.txt"
    source.write_text("data")
    (tmp_path / "escaped.txt").write_text("outside")
    store = LocalStore(root)
    with pytest.raises(UnsafeKey):
        store.put_file(source, key)
    with pytest.raises(UnsafeKey):
        store.get_file(key, tmp_path / "copy.txt")
    with pytest.raises(UnsafeKey):
        store.delete(key)
    assert (tmp_path / "escaped.txt").read_text() == "outside"
    assert not (tmp_path / "copy.txt").exists()


def test_local_store_does_not_follow_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    source = tmp_path / "source.txt"
    source.write_text("data")
    with pytest.raises(UnsafeKey, match="leads out of"):
        LocalStore(root).put_file(source, "link/file.txt")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_s3_store_refuses_keys_outside_its_prefix(tmp_path: Path) -> None:
    # Refused before any request: the endpoint does not even have to exist.
    store = S3Store("s3://bucket/runs/tiny", StorageSpec(endpoint="127.0.0.1:9", insecure=True))
    with pytest.raises(UnsafeKey):
        store.get_file("../other-run/manifest.json", tmp_path / "m.json")
    with pytest.raises(UnsafeKey):
        store.put_file(tmp_path / "m.json", "/manifest.json")


def test_publish_refuses_a_symlink_in_the_staging_directory(victim: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "README.md").write_text("# run\n")
    (staging / "loss.png").symlink_to(victim)
    store = LocalStore(tmp_path / "out")
    with pytest.raises(UnsafeKey, match="symbolic link"):
        publish(staging, store)
    assert MANIFEST not in store.list()
