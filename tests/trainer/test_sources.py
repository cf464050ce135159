"""Source URIs resolve to local paths; what cannot be found is a SourceUnavailable (exit 4); the
download cache is kept per endpoint and a cached file is used only when it matches the object."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubetune_contract.config import StorageSpec
from kubetune_trainer.errors import InvalidInput, SourceUnavailable, StoreUnavailable
from kubetune_trainer.sources import PVC_MOUNT_ROOT, cache_path, resolve, retrying
from tests.support.trainer import MinioServer

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


def s3_storage(server: MinioServer) -> StorageSpec:
    return StorageSpec(endpoint=server.endpoint, insecure=True)


def test_two_endpoints_never_share_a_cache_entry(
    private_minio: MinioServer, minio_server_binary: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Same bucket, same key, same size, different bytes: only the endpoint tells them apart.
    other = MinioServer(minio_server_binary, tmp_path / "other", private_minio.access_key, private_minio.secret_key)
    (tmp_path / "other").mkdir()
    other.start()
    try:
        other.client().make_bucket("test")
        for server, byte in ((private_minio, b"a"), (other, b"b")):
            (tmp_path / "rows").write_bytes(byte * 1000)
            server.client().fput_object("test", "data/train.jsonl", str(tmp_path / "rows"))
        first = resolve("s3://test/data/train.jsonl", s3_storage(private_minio))
        second = resolve("s3://test/data/train.jsonl", s3_storage(other))
        assert first != second
        assert first.read_bytes() == b"a" * 1000 and second.read_bytes() == b"b" * 1000
        caplog.clear()
        with caplog.at_level("INFO", logger="kubetune_trainer.sources"):
            assert resolve("s3://test/data/train.jsonl", s3_storage(private_minio)).read_bytes() == b"a" * 1000
        assert "cached: " in caplog.text and "downloaded" not in caplog.text
    finally:
        other.stop()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("upload", "damage"),
    [("single-part", "corrupted"), ("single-part", "planted-with-forged-record"),
     ("multipart", "corrupted"), ("multipart", "planted")],
)
def test_corrupted_or_planted_cache_file_is_downloaded_again(
    upload: str, damage: str, private_minio: MinioServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib
    import json
    import os

    part = 5 * 1024 * 1024
    original = os.urandom(part + 1 if upload == "multipart" else 1000)
    (tmp_path / "weights.bin").write_bytes(original)
    result = private_minio.client().fput_object("test", "models/m/weights.bin", str(tmp_path / "weights.bin"),
                                                part_size=part)
    assert ("-" in result.etag) == (upload == "multipart")
    storage = s3_storage(private_minio)
    cached = resolve("s3://test/models/m", storage, directory=True) / "weights.bin"
    assert cached.read_bytes() == original
    if damage == "corrupted":
        flip_last_byte(cached)  # same size: a size check alone would take it
    else:
        cached.write_bytes(os.urandom(len(original)))
        [record] = [p for p in (tmp_path / "cache").rglob("weights.bin") if p != cached]
        if damage == "planted":
            record.unlink()
        else:
            record.write_text(json.dumps({"etag": result.etag, "size": len(original),
                                          "sha256": hashlib.sha256(cached.read_bytes()).hexdigest()}))

    caplog.clear()
    with caplog.at_level("INFO", logger="kubetune_trainer.sources"):
        assert resolve("s3://test/models/m", storage, directory=True) / "weights.bin" == cached
    assert cached.read_bytes() == original
    assert f"cached {cached} is not used: " in caplog.text
    assert "downloaded s3://test/models/m/weights.bin" in caplog.text


@pytest.mark.parametrize("uri", ["s3://test/../../escaped", "s3://test/data/../../../../escaped", "s3://../escaped",
                                 "s3://test/data/./train.jsonl", "s3://test/data//train.jsonl"])
def test_s3_key_cannot_leave_the_cache_directory(uri: str, tmp_path: Path) -> None:
    # Refused before any request: the endpoint does not even have to exist.
    with pytest.raises(InvalidInput, match="cannot be stored in the download cache"):
        resolve(uri, StorageSpec(endpoint="127.0.0.1:9", insecure=True))
    assert not list(tmp_path.rglob("escaped"))


def test_listed_object_names_cannot_leave_the_cache_directory(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "s3" / "endpoint"
    assert cache_path(root, "test", "models/m/config.json", "s3://test/models/m") == root / "test/models/m/config.json"
    for name in ("models/m/../../../../escaped", "/etc/passwd", "models/m/.."):
        with pytest.raises(InvalidInput, match=re.escape(repr(name))):
            cache_path(root, "test", name, "s3://test/models/m")


@pytest.mark.parametrize("uri", ["file:///proc/self/environ", "/proc/self/environ", "/etc/passwd",
                                 "/var/run/secrets/kubernetes.io/serviceaccount/token", "/sys/kernel"])
def test_the_process_own_files_are_never_data(uri: str) -> None:
    # /proc/self/environ holds the pod's Secrets: read as CSV, its "header" would land in status.
    with pytest.raises(InvalidInput, match="is a system path, not data"):
        resolve(uri, StorageSpec())


def test_a_pvc_source_cannot_leave_its_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "secret.csv").write_text("a,b\n1,2\n")
    (tmp_path / "data" / "train.csv").write_text("a,b\n1,2\n")
    (tmp_path / "data" / "link.csv").symlink_to(tmp_path / "other" / "secret.csv")
    (tmp_path / "data" / "environ").symlink_to("/proc/self/environ")
    assert resolve("pvc://data/train.csv", StorageSpec()) == tmp_path / "data" / "train.csv"
    for uri in ("pvc://data/../other/secret.csv", "pvc://data/link.csv"):
        with pytest.raises(InvalidInput, match="leaves its claim"):
            resolve(uri, StorageSpec())
    with pytest.raises(InvalidInput, match=r"leaves its claim|system path"):
        resolve("pvc://data/environ", StorageSpec())


def test_store_retries_heal_a_transient_error_give_up_after_the_window_and_never_retry_a_wrong_request() -> None:
    answers: list[BaseException | str] = [ConnectionError("refused"), TimeoutError("slow"), "ok"]

    def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert retrying("list s3://b/k", flaky, window=30) == "ok"

    def down() -> str:
        raise ConnectionError("connection refused")

    with pytest.raises(StoreUnavailable, match=r"upload s3://b/k: object store unreachable for 0.6s "
                                              r"\(KUBETUNE_STORE_RETRY_SECONDS\): ConnectionError") as gave_up:
        retrying("upload s3://b/k", down, window=0.6, unavailable=StoreUnavailable)
    assert isinstance(gave_up.value.__cause__, ConnectionError)

    calls = []

    def wrong() -> str:
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        retrying("get s3://b/k", wrong, window=30)
    assert calls == [1], "an error that is not transient is raised at once"

