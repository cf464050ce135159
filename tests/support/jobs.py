"""Helpers for operator e2e tests: the operator as a child process, FineTuneJob manifests and
waits on their status."""

from __future__ import annotations

import base64
import collections
import contextlib
import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from kubetune_contract.config import StorageSpec
from kubetune_trainer.artifacts import verify_manifest
from tests.support.helpers import REPO, free_port, wait_for

Cluster = Any  # tests/conftest.py's Cluster


class Operator:
    """`kubetune operator --namespace NS` as a child process, with the settings a test chooses,
    under the chart's ServiceAccount and RBAC. Its report endpoint listens on ``report_host``, the
    node address: pods on the pod network reach this machine there."""

    def __init__(self, cluster: Cluster, namespace: str, log_dir: Path, env: dict[str, str],
                 report_host: str) -> None:
        self.cluster, self.namespace, self.log_dir, self.extra_env = cluster, namespace, log_dir, env
        self.report_key = secrets.token_urlsafe(32)  # kept across restarts, as the chart's Secret is
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # Fixed for this operator's lifetime: pods keep the report URL across operator restarts.
        self.report_port = free_port()
        self.report_host = report_host
        self.report_url = f"http://{report_host}:{self.report_port}"

    def start(self) -> Operator:
        port = free_port()
        env = {
            **self.cluster.env,
            "KUBETUNE_RESYNC_SECONDS": "5",
            "KUBETUNE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{port}/healthz",
            "KUBETUNE_REPORT_LISTEN": f"{self.report_host}:{self.report_port}",
            "KUBETUNE_REPORT_URL": self.report_url,
            "KUBETUNE_STATUS_INTERVAL": "1",
            "KUBETUNE_REPORT_KEY": self.report_key,
            **self.extra_env,
        }
        self.health_url = f"http://127.0.0.1:{port}/healthz"
        self.starts += 1
        log = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "operator", "--namespace", self.namespace],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, "operator exited"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return bool(response.status == 200)

        wait_for(healthy, timeout=60, message="operator liveness endpoint")
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the operator: SIGKILL (a crash) or SIGTERM (a clean shutdown)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log")))


@contextlib.contextmanager
def running_operator(cluster: Cluster, namespace: str, log_dir: Path, env: dict[str, str],
                     report_host: str) -> Iterator[Operator]:
    running = Operator(cluster, namespace, log_dir, env, report_host).start()
    try:
        yield running
    finally:
        running.stop()
        if os.environ.get("KUBETUNE_SHOW_OPERATOR_LOGS"):
            print(running.logs())


class Signals:
    """An HTTP endpoint for the TEST DOUBLE trainer's FAKE_WAIT_FOR and FAKE_STARTED (URLs work from
    any node, host files only from the process node): ``gate(name)`` answers 200 once the test
    ``open``s it (404 before); ``started(name)`` counts the POSTs of trainer starts."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.opened: set[str] = set()
        self.counts: collections.Counter[str] = collections.Counter()
        signals = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kind, _, name = self.path.strip("/").partition("/")
                self.send_response(200 if kind == "gate" and name in signals.opened else 404)
                self.end_headers()

            def do_POST(self) -> None:
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "started":
                    signals.counts[name] += 1
                self.send_response(204 if kind == "started" else 404)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gate(self, name: str) -> str:
        return f"{self.url}/gate/{name}"

    def open(self, name: str) -> None:
        self.opened.add(name)

    def started(self, name: str) -> str:
        return f"{self.url}/started/{name}"

    def starts(self, name: str) -> int:
        return self.counts[name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def env(**values: str) -> list[dict[str, str]]:
    """A container env list (spec.env), e.g. the TEST DOUBLE trainer's FAKE_* settings."""
    return [{"name": k, "value": v} for k, v in values.items()]


def finetunejob(name: str, **spec: Any) -> dict[str, Any]:
    """A small valid FineTuneJob; keyword arguments replace spec sections. CPU-only by default: the
    local node's two GPUs are left to the tests about GPUs, so no test waits for another's pods."""
    body: dict[str, Any] = {
        "model": {"source": "s3://models/tiny/"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "training": {"maxSteps": 10},
        "output": {"location": "s3://runs/"},
        "resources": {"gpus": 0, "sharedMemory": "64Mi"},
        "backoffLimit": 0,
    }
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def report_token(cluster: Cluster, namespace: str, name: str) -> str:
    """The report token the operator gave a FineTuneJob (from its report Secret)."""
    secrets = cluster.get("secrets", "-n", namespace, "-l", f"kubetune.io/job={name}")["items"]
    assert len(secrets) == 1, [s["metadata"]["name"] for s in secrets]
    return base64.b64decode(secrets[0]["data"]["token"]).decode()


def ftj(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.get("finetunejob", name, "-n", namespace)
    return result


def wait_phase(cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 120,
               reason: str | None = None) -> dict[str, Any]:
    """Wait until the FineTuneJob reaches a phase (and reason); return its status."""

    def reached() -> dict[str, Any] | None:
        status: dict[str, Any] = ftj(cluster, namespace, name).get("status") or {}
        if status.get("phase") == phase and (reason is None or status.get("reason") == reason):
            return status
        return None

    return wait_for(reached, timeout=timeout, message=f"{namespace}/{name} phase {phase} {reason or ''}")


def events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """Events posted on a FineTuneJob, oldest first."""
    found = cluster.get("events", "-n", namespace, "--field-selector",
                        f"involvedObject.kind=FineTuneJob,involvedObject.name={name}")["items"]
    return sorted(found, key=lambda e: e.get("firstTimestamp") or "")


def event_reasons(cluster: Cluster, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in events(cluster, namespace, name)]


def published(status: dict[str, Any], minio_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Verify the run's manifest; return the published metrics.jsonl events."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_env["MINIO_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_env["MINIO_SECRET_KEY"])
    location = status["artifacts"]["location"].rstrip("/")
    manifest = verify_manifest(location, StorageSpec(endpoint=minio_env["MINIO_ENDPOINT"], insecure=True))
    assert "adapter/adapter_model.safetensors" in {entry["path"] for entry in manifest["files"]}
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    client = Minio(minio_env["MINIO_ENDPOINT"], access_key=minio_env["MINIO_ACCESS_KEY"],
                   secret_key=minio_env["MINIO_SECRET_KEY"], secure=False)
    response = client.get_object(bucket, f"{prefix}/metrics.jsonl")
    try:
        return [json.loads(line) for line in response.read().decode().splitlines() if line]
    finally:
        response.close()
        response.release_conn()


def train_steps(events: list[Any]) -> list[int]:
    return [e["step"] for e in events if e.get("type", "progress") == "progress" and "trainLoss" in e]


class WatchHistory:
    """Every distinct value each object of a watch took, in order, per object name: the whole
    history, not samples of it. ``list_call(*args)`` is the namespaced list to watch; ``value(obj)``
    what to record (None: nothing); ``name(obj)`` the object's name."""

    def __init__(self, list_call: Callable[..., Any], *args: Any, value: Callable[[Any], Any],
                 name: Callable[[Any], str], timeout_s: int = 900) -> None:
        from kubernetes import watch

        self.values: dict[str, list[Any]] = {}
        self.error: Exception | None = None
        self._stopped = False
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(list_call, args, value, name, timeout_s),
                                        daemon=True)
        self._thread.start()

    def _run(self, list_call: Callable[..., Any], args: tuple[Any, ...], value: Callable[[Any], Any],
             name: Callable[[Any], str], timeout_s: int) -> None:
        try:
            for event in self._watch.stream(list_call, *args, timeout_seconds=timeout_s):
                seen = value(event["object"])
                if seen is None:
                    continue
                with self._lock:
                    history = self.values.setdefault(name(event["object"]), [])
                    if not history or history[-1] != seen:
                        history.append(seen)
        except Exception as error:  # the stream ends when the test stops it or its namespace goes
            if not self._stopped:
                self.error = error

    def history(self, name: str) -> list[Any]:
        assert self.error is None, f"the watch broke: {self.error!r}"
        with self._lock:
            return list(self.values.get(name, []))

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()  # type: ignore[no-untyped-call]
