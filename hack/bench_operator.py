"""Operator benchmarks on the local cluster (figures printed, recorded in docs/benchmarks.md).

    python hack/bench_operator.py [--dir .kubetune] [--jobs 20] [--report-seconds 60]

1. apply → Job created: N FineTuneJobs applied at once (one `kubectl apply`); the time until each
   Job appears is taken from a watch on Jobs (median, p95, max), plus apply → Succeeded.
2. report → status: one job (held running) receives a report every 0.5 s for a while; a watch on
   the FineTuneJob times each report until its step shows in status.progress (median, p95), and
   counts status writes per minute.

Jobs run the e2e TEST DOUBLE trainer (tests/e2e/fake_trainer.py): this measures the operator and
the control plane, not training.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAKE_TRAINER = REPO / "tests" / "e2e" / "fake_trainer.py"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):.3f}s  p95 {percentile(values, 95):.3f}s  "
            f"max {max(values):.3f}s  (n={len(values)})")


def ftj(name: str, env: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "s3://m/tiny/"}, "dataset": {"train": "s3://d/train.jsonl"},
                     "training": {"maxSteps": 10}, "output": {"location": "s3://runs/"},
                     "resources": {"gpus": 0, "sharedMemory": "16Mi"}, "backoffLimit": 0, "env": env or []}}


class Bench:
    def __init__(self, state: Path) -> None:
        from kubernetes import client, config

        self.env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig")}
        self.kubectl = str(state / "bin" / "kubectl")
        self.api = config.new_client_from_config(config_file=str(state / "kubeconfig"))
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.namespace = f"bench-{secrets.token_hex(3)}"

    def run(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run([self.kubectl, *args], input=stdin, env=self.env, text=True, check=True,
                              capture_output=True).stdout

    def watch_times(self, list_call: Any, stop: threading.Event, on_event: Any) -> threading.Thread:
        from kubernetes import watch

        def loop() -> None:
            while not stop.is_set():
                for event in watch.Watch().stream(list_call, self.namespace, timeout_seconds=2):
                    on_event(time.monotonic(), event["object"])
                    if stop.is_set():
                        return

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def job_creation(self, count: int) -> None:
        created: dict[str, float] = {}
        succeeded: dict[str, float] = {}
        stop = threading.Event()

        def on_job(now: float, job: Any) -> None:
            created.setdefault(job.metadata.name, now)

        def on_ftj(now: float, obj: dict[str, Any]) -> None:
            if (obj.get("status") or {}).get("phase") == "Succeeded":
                succeeded.setdefault(obj["metadata"]["name"], now)

        self.watch_times(self.batch.list_namespaced_job, stop, on_job)
        self.watch_times(lambda ns, **kw: self.custom.list_namespaced_custom_object(
            "kubetune.io", "v1alpha1", ns, "finetunejobs", **kw), stop, on_ftj)
        manifests = "\n---\n".join(json.dumps(ftj(f"job-{i:02d}")) for i in range(count))
        start = time.monotonic()
        self.run("apply", "-n", self.namespace, "-f", "-", stdin=manifests)
        deadline = time.monotonic() + 300
        while (len(created) < count or len(succeeded) < count) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        print(f"apply -> Job created, {count} jobs applied at once: {summary([t - start for t in created.values()])}")
        print(f"apply -> Succeeded:                        {summary([t - start for t in succeeded.values()])}")

    def report_latency(self, report_url: str, seconds: float) -> None:
        hold = self.namespace_path("release")
        self.run("apply", "-n", self.namespace, "-f", "-",
                 stdin=json.dumps(ftj("reporter", env=[{"name": "FAKE_WAIT_FOR", "value": str(hold)}])))
        secret = None
        while secret is None:
            found = self.core.list_namespaced_secret(self.namespace, label_selector="kubetune.io/job=reporter").items
            secret = found[0] if found else None
            if secret is None:
                time.sleep(0.1)
        token = base64.b64decode(secret.data["token"]).decode()
        posted: dict[int, float] = {}
        seen: dict[int, float] = {}
        writes = [0]
        stop = threading.Event()

        def on_ftj(now: float, obj: dict[str, Any]) -> None:
            step = ((obj.get("status") or {}).get("progress") or {}).get("step")
            if obj["metadata"]["name"] == "reporter" and step is not None and step not in seen:
                seen[step] = now
                writes[0] += 1

        self.watch_times(lambda ns, **kw: self.custom.list_namespaced_custom_object(
            "kubetune.io", "v1alpha1", ns, "finetunejobs", **kw), stop, on_ftj)
        url = f"{report_url}/v1/reports/{self.namespace}/reporter"
        begin = time.monotonic()
        step = 0
        while time.monotonic() - begin < seconds:
            step += 1
            body = json.dumps({"type": "progress", "step": step, "totalSteps": 100000, "loss": 1.0}).encode()
            request = urllib.request.Request(url, data=body, method="POST", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            posted[step] = time.monotonic()
            urllib.request.urlopen(request, timeout=5).read()
            time.sleep(0.5)
        time.sleep(5)
        stop.set()
        hold.touch()
        # Written: each status write carries the newest report, timed from that report.
        written = [seen[s] - posted[s] for s in seen if s in posted]
        # Visible: every report, timed until a status with its step (or a later one) shows.
        visible = [min(t for s2, t in seen.items() if s2 >= s) - posted[s]
                   for s in posted if any(s2 >= s for s2 in seen)]
        minutes = (max(seen.values()) - begin) / 60 if seen else 1
        print("report -> status, a report every 0.5s, status interval 3s:")
        print(f"  report that is written -> in status: {summary(written)}")
        print(f"  any report -> its step or a later one in status: {summary(visible)}")
        print(f"status writes from reports: {writes[0] / minutes:.1f} per job per minute ({step} reports sent)")

    def namespace_path(self, name: str) -> Path:
        path = Path(f"/tmp/kubetune-bench-{self.namespace}")
        path.mkdir(exist_ok=True)
        return path / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".kubetune")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--report-seconds", type=float, default=60)
    args = parser.parse_args()
    bench = Bench(args.dir)
    bench.run("create", "namespace", bench.namespace)
    bench.run("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    report_port = 18081
    operator = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "operator", "--namespace", bench.namespace],
        env={**bench.env, "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", str(FAKE_TRAINER)]),
             "KUBETUNE_REPORT_LISTEN": f"127.0.0.1:{report_port}",
             "KUBETUNE_REPORT_URL": f"http://127.0.0.1:{report_port}",
             "KUBETUNE_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{report_port}/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        bench.job_creation(args.jobs)
        bench.report_latency(f"http://127.0.0.1:{report_port}", args.report_seconds)
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        bench.run("delete", "namespace", bench.namespace, "--wait=false")


if __name__ == "__main__":
    main()
