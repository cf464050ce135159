"""A real MinIO server stopped and restarted: a short outage is ridden out, a long one ends the run
with exit code 5 (after this pod wrote to the store) or 4 (the store never answered)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_contract.config import StorageSpec
from kubetune_trainer.__main__ import main
from kubetune_trainer.artifacts import S3Store, publish
from kubetune_trainer.errors import SourceUnavailable, StoreUnavailable, TrainerError
from kubetune_trainer.sources import resolve
from tests.support.helpers import wait_for
from tests.support.trainer import REPO, MinioServer, tiny_config

pytestmark = pytest.mark.trainer


def storage(server: MinioServer) -> StorageSpec:
    return StorageSpec(endpoint=server.endpoint, insecure=True)


class RetryWatcher(logging.Handler):
    """Sets ``seen`` when a retry after an unreachable store is logged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "object store unreachable" in record.getMessage() and "retrying" in record.getMessage():
            self.seen.set()


@pytest.fixture
def retry_watcher() -> Iterator[RetryWatcher]:
    watcher = RetryWatcher()
    logger = logging.getLogger("kubetune_trainer.sources")
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)


def during_outage(server: MinioServer, watcher: RetryWatcher, operation: Callable[[], Any]) -> Any:
    """Stop the server, start ``operation``, restart the server once the operation has had to retry,
    and return what the operation returned."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = operation()
        except BaseException as err:
            outcome["error"] = err

    server.stop()
    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert watcher.seen.wait(timeout=60), "the operation never retried"
        assert thread.is_alive(), f"the operation gave up during the outage: {outcome}"
    finally:
        server.start()
        thread.join(timeout=120)
    assert not thread.is_alive(), "the operation did not finish after the store came back"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@pytest.mark.parametrize("operation", ["put", "get", "list", "size", "delete"])
def test_store_operation_survives_a_short_outage(
    operation: str, private_minio: MinioServer, retry_watcher: RetryWatcher, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBETUNE_STORE_RETRY_SECONDS", "120")
    store = S3Store("s3://test/runs/tiny", storage(private_minio))
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(100_000))
    store.put_file(source, "adapter/weights.bin")

    if operation == "put":
        during_outage(private_minio, retry_watcher, lambda: store.put_file(source, "adapter/second.bin"))
        assert store.size("adapter/second.bin") == 100_000
    elif operation == "get":
        during_outage(private_minio, retry_watcher, lambda: store.get_file("adapter/weights.bin", tmp_path / "got"))
        assert (tmp_path / "got").read_bytes() == source.read_bytes()
    elif operation == "list":
        assert during_outage(private_minio, retry_watcher, lambda: store.list("adapter/")) == ["adapter/weights.bin"]
    elif operation == "size":
        assert during_outage(private_minio, retry_watcher, lambda: store.size("adapter/weights.bin")) == 100_000
    else:
        during_outage(private_minio, retry_watcher, lambda: store.delete("adapter/weights.bin"))
        assert store.list() == []


def test_s3_download_survives_a_short_outage(
    assets: Path, private_minio: MinioServer, retry_watcher: RetryWatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minio import Minio

    monkeypatch.setenv("KUBETUNE_STORE_RETRY_SECONDS", "120")
    client = Minio(private_minio.endpoint, access_key=private_minio.access_key,
                   secret_key=private_minio.secret_key, secure=False)
    client.fput_object("test", "data/train.jsonl", str(assets / "data" / "train.jsonl"))
    path = during_outage(private_minio, retry_watcher,
                         lambda: resolve("s3://test/data/train.jsonl", storage(private_minio)))
    assert path.read_bytes() == (assets / "data" / "train.jsonl").read_bytes()


@pytest.mark.slow
def test_outage_past_the_window_is_exit_5_after_a_write_and_exit_4_before(
    private_minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_STORE_RETRY_SECONDS", "2")
    source = tmp_path / "state.json"
    source.write_text("{}")
    wrote = S3Store("s3://test/runs/wrote", storage(private_minio))
    wrote.put_file(source, "state.json")
    never_wrote = S3Store("s3://test/runs/never", storage(private_minio))
    assert never_wrote.list() == []
    private_minio.stop()

    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="KUBETUNE_STORE_RETRY_SECONDS") as after_write:
        wrote.put_file(source, "checkpoints/step-2/state.json")
    assert 2 <= time.monotonic() - started < 30, "retried for the window, and not much longer"
    assert after_write.value.exit_code == 5

    with pytest.raises(SourceUnavailable, match="object store unreachable") as before_write:
        never_wrote.list("checkpoints/")
    assert before_write.value.exit_code == 4
    with pytest.raises(SourceUnavailable) as download:
        resolve("s3://test/data/train.jsonl", storage(private_minio))
    assert download.value.exit_code == 4


def test_trainer_exits_4_when_the_store_never_answered(
    assets: Path, private_minio: MinioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_minio.stop()
    monkeypatch.setenv("KUBETUNE_STORE_RETRY_SECONDS", "1")
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config(
        assets, "s3://test/runs", storage={"endpoint": private_minio.endpoint, "insecure": True})))
    assert main(["--config", str(config)]) == 4
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 4 and "output.location" in summary["error"]


@pytest.mark.slow
def test_trainer_exits_5_when_the_store_goes_away_mid_run(
    assets: Path, private_minio: MinioServer, tmp_path: Path
) -> None:
    cfg = tiny_config(assets, "s3://test/runs", training={"maxSteps": 200, "checkpointEverySteps": 2},
                      storage={"endpoint": private_minio.endpoint, "insecure": True})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "KUBETUNE_STORE_RETRY_SECONDS": "2",
           "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    stdout = tmp_path / "stdout"
    with stdout.open("w") as out, (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "--config", str(config)],
                                stdout=out, stderr=err, env=env, cwd=REPO)
        try:
            wait_for(lambda: '"type":"checkpoint"' in stdout.read_text() or proc.poll() is not None,
                     timeout=300, message="the first checkpoint")
            private_minio.stop()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 5, stderr
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["exitCode"] == 5 and "object store unreachable" in summary["error"]
    assert 2 <= summary["step"] < 200
    # The checkpoints written before the outage are intact for the replacement pod.
    private_minio.start()
    store = S3Store("s3://test/runs/tiny", storage(private_minio))
    complete = [int(k.split("/")[1][5:]) for k in store.list("checkpoints/") if k.endswith("/checkpoint.json")]
    assert complete and max(complete) <= summary["step"]


def test_manifest_is_not_written_when_an_uploaded_object_is_gone(
    private_minio: MinioServer, tmp_path: Path
) -> None:
    from minio import Minio

    client = Minio(private_minio.endpoint, access_key=private_minio.access_key,
                   secret_key=private_minio.secret_key, secure=False)
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (staging / "loss.png").write_bytes(os.urandom(512))
    store = S3Store("s3://test/runs/tiny", storage(private_minio))

    def lose_the_adapter(key: str) -> None:
        # Another writer, or a lifecycle rule, removes an object between its upload and the manifest.
        if key == "loss.png":
            client.remove_object("test", "runs/tiny/adapter/adapter_model.safetensors")

    with pytest.raises(TrainerError, match=r"adapter/adapter_model\.safetensors: uploaded 4096 bytes but the "
                                           r"store has no such object; manifest\.json not written"):
        publish(staging, store, on_upload=lose_the_adapter)
    assert store.list("manifest.json") == []
