"""Source URIs resolve to local paths; what cannot be found is a SourceUnavailable (exit 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import SourceUnavailable
from kubetune_trainer.sources import PVC_MOUNT_ROOT, resolve

pytestmark = pytest.mark.trainer

STORAGE = StorageSpec()


def test_pvc_sources_live_under_the_mount_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PVC_MOUNT_ROOT == "/mnt/pvc"
    (tmp_path / "claim" / "data").mkdir(parents=True)
    (tmp_path / "claim" / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    assert resolve("pvc://claim/data/train.jsonl", STORAGE) == tmp_path / "claim" / "data" / "train.jsonl"
    with pytest.raises(SourceUnavailable, match=r"pvc://claim/nope\.jsonl"):
        resolve("pvc://claim/nope.jsonl", STORAGE)


def test_file_uris_and_plain_paths_are_used_in_place(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,answer\n")
    assert resolve(f"file://{path}", STORAGE) == path
    assert resolve(str(path), STORAGE) == path
    with pytest.raises(SourceUnavailable, match="does not exist"):
        resolve(f"file://{tmp_path}/missing.csv", STORAGE)


@pytest.mark.parametrize("uri", ["hf://org/model", "hf://datasets/org/name/train.jsonl"])
def test_hf_sources_fail_fast_when_offline(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceUnavailable, match="HF_HUB_OFFLINE"):
        resolve(uri, STORAGE, directory=uri.startswith("hf://org"))


def test_hf_sources_use_the_cache_when_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub cache layout: <cache>/hf/<kind>s--org--name/{refs/main, snapshots/<commit>/...}.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path))
    commit = "0" * 40
    for kind, name in (("models", "config.json"), ("datasets", "train.jsonl")):
        repo = tmp_path / "hf" / f"{kind}--org--name"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / name).write_text("{}")
    model = resolve("hf://org/name", STORAGE, directory=True)
    assert (model / "config.json").is_file()
    assert resolve("hf://datasets/org/name/train.jsonl", STORAGE).read_text() == "{}"
