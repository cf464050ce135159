"""What the operator bench (hack/bench_operator.py) measures with: percentiles and the results
table, a raw JSON client with watches, `kubetune operator` as a process with its RSS, CPU time and
API request counts, and kopf's own requests as the API server counts them."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devcluster import images
from tests.support.helpers import free_port, wait_for

CREATORS = 8  # client threads that create a series' objects
Json = dict[str, Any]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Row:
    series: str
    size: int
    what: str
    values: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.values)

    @property
    def p95(self) -> float:
        return percentile(self.values, 95)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, series: str, size: int, what: str, values: Iterable[float]) -> Row:
        row = Row(series, size, what, list(values))
        self.rows.append(row)
        print(f"  {series} {size}: {what}: median {row.p50:.3f}s  p95 {row.p95:.3f}s  max {max(row.values):.3f}s "
              f"(n={len(row.values)})", flush=True)
        return row

    def fact(self, what: str, value: str) -> None:
        self.facts.append((what, value))
        print(f"  {what}: {value}", flush=True)

    def table(self) -> str:
        floors = {r.size: r.p95 for r in self.rows if r.series == "floor"}
        lines = ["| series | jobs | measured | median | p95 | max | p95 / floor p95 |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = f"{r.p95 / floors[r.size]:.1f}x" if floors.get(r.size) else "—"
            lines.append(f"| {r.series} | {r.size} | {r.what} | {r.p50:.3f} s | {r.p95:.3f} s | "
                         f"{max(r.values):.3f} s | {ratio} |")
        lines += ["", "| figure | value |", "|---|---|"]
        lines += [f"| {what} | {value} |" for what, value in self.facts]
        return "\n".join(lines)


class Api:
    """Raw JSON requests and watches (no model objects: the bench must stay light next to what it measures)."""

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import config

        self.client = config.new_client_from_config(config_file=str(kubeconfig))
        self.client.rest_client.pool_manager.connection_pool_kw["maxsize"] = CREATORS + 8

    def raw(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
            timeout: float = 60) -> Any:
        """The response, unread (a watch streams it)."""
        params = self.client.param_serialize(
            method=method, resource_path=path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": "application/json"})
        response = self.client.call_api(*params, _request_timeout=timeout)
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {response.read()[:500]!r}")
        return response

    def request(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None) -> Json:
        data = self.raw(method, path, body, query).read()
        return json.loads(data) if data and data[:1] == b"{" else {}

    def text(self, path: str) -> str:
        return str(self.raw("GET", path).read().decode())

    def create_all(self, path: str, bodies: list[Json]) -> dict[str, float]:
        """POST every body from CREATORS threads; when each create request was sent, by name."""
        sent: dict[str, float] = {}

        def create(body: Json) -> None:
            sent[body["metadata"]["name"]] = time.monotonic()
            self.request("POST", path, body)

        with ThreadPoolExecutor(CREATORS) as pool:
            list(pool.map(create, bodies))
        return sent

    def watch(self, path: str, on_event: Callable[[float, str, Json], None], stop: threading.Event) -> None:
        """Follow `path` from now on in a thread, calling on_event(seen, type, object) per event."""
        from kubernetes.watch.watch import iter_resp_lines

        version = self.request("GET", path, query=[("limit", "1")])["metadata"]["resourceVersion"]
        started = threading.Event()

        def loop() -> None:
            nonlocal version
            while not stop.is_set():
                response = self.raw("GET", path, query=[("watch", "1"), ("resourceVersion", version),
                                                        ("allowWatchBookmarks", "true"), ("timeoutSeconds", "5")])
                started.set()
                for line in iter_resp_lines(response.response):
                    seen = time.monotonic()
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch {path}: {event['object'].get('message')}")
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        on_event(seen, event["type"], event["object"])
                    if stop.is_set():
                        break
                response.response.release_conn()

        threading.Thread(target=loop, daemon=True).start()
        started.wait(30)


class Operator:
    """`kubetune operator` for the bench namespaces, with the TEST DOUBLE trainer image
    (tests/e2e/fake_trainer.Dockerfile), whose pods report to ``report_host`` (the node address)."""

    def __init__(self, env: dict[str, str], trainer_image: str, report_host: str) -> None:
        self.port = free_port()
        self.url = f"http://{report_host}:{self.port}"
        trainer = {"KUBETUNE_TRAINER_IMAGE": trainer_image,
                   "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", images.TEST_DOUBLE_PATH])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "operator"],  # cluster-wide, as the chart installs it
            env={**env, **trainer,
                 "KUBETUNE_REPORT_LISTEN": f"{report_host}:{self.port}", "KUBETUNE_REPORT_URL": self.url,
                 "KUBETUNE_REPORT_KEY": secrets.token_hex(16), "KUBETUNE_LOG_LEVEL": "WARNING"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def healthy() -> bool:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return True
            except OSError:
                return False

        wait_for(healthy, 60, "the operator's /healthz")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def api_requests(self) -> dict[str, float]:
        """The operator's own API requests so far (its kubetune_api_requests_total), by verb and resource."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=5).read().decode()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("kubetune_api_requests_total{"):
                labels, value = line.rsplit(" ", 1)
                found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                counts[f"{found['verb']} {found['resource']}"] = float(value)
        return counts

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def kopf_patches(api: Api) -> float:
    """PATCH requests on finetunejobs themselves (not /status): kopf's finalizer bookkeeping."""
    total = 0.0
    for line in api.text("/metrics").splitlines():
        if (line.startswith("apiserver_request_total{") and 'resource="finetunejobs"' in line
                and 'verb="PATCH"' in line and 'subresource=""' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def requests_since(operator: Operator, api: Api, before: tuple[dict[str, float], float]) -> dict[str, float]:
    """API requests since `before` (from `request_counts`), by verb and resource; kopf's as 'PATCH finetunejobs'."""
    own, kopf = request_counts(operator, api)
    delta = {key: value - before[0].get(key, 0.0) for key, value in own.items()}
    delta["PATCH finetunejobs (kopf)"] = kopf - before[1]
    return {key: value for key, value in delta.items() if value}


def request_counts(operator: Operator, api: Api) -> tuple[dict[str, float], float]:
    return operator.api_requests(), kopf_patches(api)


def per_job(requests: dict[str, float], size: int) -> str:
    return ", ".join(f"{key} {value / size:.1f}" for key, value in sorted(requests.items()))
