"""Chaos suite (`make chaos`, not part of `make test`): the real trainer on tiny models while
things break, each scenario bounded in time; a table of figures is printed at the end
(docs/benchmarks.md records it).

- 30 jobs while the operator is SIGKILLed at random every 5-20 s: no duplicate Job, no lost job,
  all Succeeded, status never goes backwards;
- a training container SIGKILLed 3 times (as the OOM killer or a crash would, no SIGTERM first):
  Succeeded, each restart wastes at most one checkpoint interval;
- MinIO stopped for 3 minutes mid-run: Succeeded after it returns, manifest verified;
- the API server black-holed for 60 s: every job Succeeded within 60 s after healing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster import node_cleanup
from kubetune_contract.config import StorageSpec
from kubetune_trainer.artifacts import verify_manifest
from tests.support.helpers import devcluster, wait_for
from tests.support.jobs import ftj, wait_phase

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[3]
BUCKET = "kubetune-demo"  # devcluster/seed_demo.py's (the demo_bucket fixture seeds it)

ROWS: list[tuple[str, str, str]] = []  # (scenario, figure, value)
CHECKPOINT_EVERY = 10


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    width = max((len(s) for s, _, _ in ROWS), default=10)
    print("\n\nchaos results\n" + "\n".join(f"| {s:<{width}} | {f} | {v} |" for s, f, v in ROWS))


@pytest.fixture
def operator_env(real_trainer_env: dict[str, str]) -> dict[str, str]:
    return real_trainer_env


@pytest.fixture
def credentials(cluster: Any, namespace: str, minio_env: dict[str, str]) -> None:
    cluster.kubectl("create", "secret", "generic", "kubetune-s3", "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={minio_env['MINIO_ACCESS_KEY']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={minio_env['MINIO_SECRET_KEY']}")


def tiny_job(name: str, steps: int, gpus: int = 1, backoff: int = 6) -> dict[str, Any]:
    """A real training run of the demo's tiny backbone."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": {
        "model": {"source": f"s3://{BUCKET}/models/tiny-llama/"},
        "dataset": {"train": f"s3://{BUCKET}/data/train.jsonl",
                    "validation": f"s3://{BUCKET}/data/validation.jsonl",
                    "promptColumn": "prompt", "answerColumn": "answer", "maxLength": 64},
        "training": {"maxSteps": steps, "batchSize": 8, "learningRate": 0.003, "logEverySteps": 1,
                     "evalEverySteps": steps, "checkpointEverySteps": CHECKPOINT_EVERY,
                     "gradientCheckpointing": False},
        "lora": {"r": 8, "alpha": 16},
        "output": {"location": f"s3://{BUCKET}/chaos/"},
        "storage": {"insecure": True, "secretRef": {"name": "kubetune-s3"}},
        "resources": {"gpus": gpus, "sharedMemory": "256Mi"},
        "backoffLimit": backoff,
    }}


class Watcher:
    """Polls every FineTuneJob of a namespace; records regressions of phase or progress."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.steps: dict[str, int] = {}
        self.phases: dict[str, str] = {}
        self.regressions: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                items = self.cluster.get("ftj", "-n", self.namespace)["items"]
            except Exception:  # the API server may be black-holed: try again
                continue
            for item in items:
                name, status = item["metadata"]["name"], item.get("status") or {}
                step, phase = (status.get("progress") or {}).get("step"), status.get("phase")
                if step is not None:
                    if step < self.steps.get(name, 0):
                        self.regressions.append(f"{name}: step {self.steps[name]} -> {step}")
                    self.steps[name] = max(step, self.steps.get(name, 0))
                before = self.phases.get(name)
                if before in ("Succeeded", "Failed") and phase != before:
                    self.regressions.append(f"{name}: phase {before} -> {phase}")
                if phase:
                    self.phases[name] = phase


def jobs_per_owner(cluster: Any, namespace: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in cluster.get("jobs", "-n", namespace)["items"]:
        owner = (job["metadata"].get("annotations") or {}).get("kubetune.io/finetunejob", "?")
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def test_operator_killed_at_random_while_30_jobs_train(cluster: Any, namespace: str, demo_bucket: str,
                                                       credentials: None, operator: Any) -> None:
    count, kills = 30, 0
    names = [f"chaos-{i:02d}" for i in range(count)]
    started = time.monotonic()
    with Watcher(cluster, namespace) as watcher:
        cluster.kubectl("apply", "-n", namespace, "-f", "-",
                        input="\n---\n".join(json.dumps(tiny_job(n, steps=20)) for n in names))
        rng = random.Random(7)
        deadline = time.monotonic() + 1800

        def finished() -> bool:
            return sum(p in ("Succeeded", "Failed") for p in watcher.phases.values()) == count

        while not finished():
            assert time.monotonic() < deadline, f"not all jobs ended: {watcher.phases}"
            if threading.Event().wait(rng.uniform(5, 20)) or finished():
                break
            operator.stop(kill=True)
            kills += 1
            operator.start()
        for name in names:  # the final statuses, through the restarted operator
            wait_phase(cluster, namespace, name, "Succeeded", timeout=120)
    duplicates = sum(n - 1 for n in jobs_per_owner(cluster, namespace).values())
    lost = [n for n in names if ftj(cluster, namespace, n)["status"].get("phase") != "Succeeded"]
    scenario = "30 jobs, operator SIGKILLed every 5-20 s"
    ROWS.extend([(scenario, "operator kills", str(kills)), (scenario, "duplicate Jobs", str(duplicates)),
                 (scenario, "lost jobs", str(len(lost))),
                 (scenario, "status regressions", str(len(watcher.regressions))),
                 (scenario, "wall time", f"{time.monotonic() - started:.0f} s")])
    assert duplicates == 0 and lost == [] and watcher.regressions == []


def logged_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r'"type":"progress","step":(\d+)', text)]


class PodLog:
    """`kubectl logs -f` of a running pod, copied into a file: it outlives the pod (the kubelet
    removes a deleted pod's logs); the stream ends when the container does."""

    def __init__(self, cluster: Any, namespace: str, pod: str, path: Path) -> None:
        self.path, self.file = path, path.open("wb")
        self.process = subprocess.Popen([str(cluster.kubectl_path), "logs", "-f", pod, "-n", namespace],
                                        stdout=self.file, stderr=subprocess.DEVNULL, env=cluster.env)

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def ended(self) -> bool:
        return self.process.poll() is not None

    def close(self) -> None:
        if not self.ended():
            self.process.terminate()
            self.process.wait(10)
        self.file.close()


def test_training_container_sigkilled_three_times(cluster: Any, namespace: str, demo_bucket: str, credentials: None,
                                        operator: Any, tmp_path: Path) -> None:
    name, steps = "thrice", 120
    cluster.apply(tiny_job(name, steps=steps), namespace)
    reached: list[int] = []  # the last step each killed container logged
    logs: list[PodLog] = []
    try:
        for kill in range(3):
            target = CHECKPOINT_EVERY * (3 * kill + 2) + 5  # past a checkpoint, mid-interval
            # The next pod (the killed one may still show Running until the kubelet reports it).
            killed = {log.path.stem for log in logs}
            pod = wait_for(lambda: next((p for p in cluster.get("pods", "-n", namespace, "-l",
                                                               f"kubetune.io/job={name}")["items"]
                                         if p["status"].get("phase") == "Running"
                                         and p["metadata"]["name"] not in killed  # noqa: B023
                                         and not p["metadata"].get("deletionTimestamp")), None),
                           timeout=300, message="a running training pod")
            pod_name = pod["metadata"]["name"]
            log = PodLog(cluster, namespace, pod_name, tmp_path / f"{pod_name}.log")
            logs.append(log)
            wait_for(lambda: max(logged_steps(log.text()), default=0) >= target, timeout=600,  # noqa: B023
                     message=f"step {target}")
            # SIGKILL to the container's processes, from the node: the kubelet gives a deleted pod's
            # container SIGTERM first (even with --grace-period=0), and the trainer then checkpoints.
            for pid in node_cleanup.container_pids(pod["status"]["containerStatuses"][0]["containerID"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(log.ended, timeout=120, message=f"the log stream of {pod_name} to end with its container")
            reached.append(max(logged_steps(log.text())))
        status = wait_phase(cluster, namespace, name, "Succeeded", timeout=900)
    finally:
        for log in logs:
            log.close()
    [succeeded] = [p["metadata"]["name"] for p in cluster.get("pods", "-n", namespace, "-l",
                                                              f"kubetune.io/job={name}")["items"]
                   if p["status"].get("phase") == "Succeeded"]
    last = cluster.kubectl("logs", "-n", namespace, succeeded).stdout
    # Pod i+1 resumed from the newest complete checkpoint pod i left (one resume per later pod).
    resumes = [int(m) for text in [*(log.text() for log in logs[1:]), last]
               for m in re.findall(r"resuming from step (\d+)", text)]
    wasted = [done - resumed for done, resumed in zip(reached, resumes, strict=False)]
    scenario = "training container SIGKILLed 3 times"
    ROWS.extend([(scenario, "attempts", str(status.get("attempts"))),
                 (scenario, "resumed from steps", ", ".join(map(str, resumes))),
                 (scenario, "steps trained again per restart", ", ".join(map(str, wasted))),
                 (scenario, "checkpoint interval", str(CHECKPOINT_EVERY))])
    assert len(resumes) == 3 and all(w <= CHECKPOINT_EVERY for w in wasted)


def test_minio_stopped_for_three_minutes_mid_run(cluster: Any, namespace: str, demo_bucket: str, credentials: None,
                                                minio_env: dict[str, str], operator: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name, outage = "no-store", 180.0
    cluster.apply(tiny_job(name, steps=200), namespace)
    wait_for(lambda: ((ftj(cluster, namespace, name).get("status") or {}).get("progress") or {}).get("step", 0)
             >= CHECKPOINT_EVERY + 2, timeout=600, message="training past its first checkpoint")
    devcluster("--dir", str(cluster.dir), "stop", "minio", check=True)
    stopped = time.monotonic()
    try:
        threading.Event().wait(outage)  # the fault's length
    finally:
        devcluster("--dir", str(cluster.dir), "start", "minio", check=True)
    back = time.monotonic()
    status = wait_phase(cluster, namespace, name, "Succeeded", timeout=900)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_env["MINIO_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_env["MINIO_SECRET_KEY"])
    manifest = verify_manifest(status["artifacts"]["location"].rstrip("/"),
                               StorageSpec(endpoint=minio_env["MINIO_ENDPOINT"], insecure=True))
    scenario = "MinIO stopped for 3 minutes mid-run"
    ROWS.extend([(scenario, "outage", f"{back - stopped:.0f} s"), (scenario, "attempts", str(status.get("attempts"))),
                 (scenario, "Succeeded after MinIO returned", f"{time.monotonic() - back:.0f} s"),
                 (scenario, "manifest files verified", str(len(manifest["files"])))])
    # Shorter than the trainer's store retry window (KUBETUNE_STORE_RETRY_SECONDS, 300 s): the pod rides
    # it out, and no attempt is used.
    assert status.get("attempts") == 1, status


def test_api_server_black_holed_for_a_minute(cluster: Any, namespace: str, demo_bucket: str, credentials: None,
                                            proxied_operator: Any, apiserver_proxy: Any) -> None:
    names = ["blind-a", "blind-b"]
    for name in names:
        cluster.apply(tiny_job(name, steps=40), namespace)
    for name in names:
        wait_phase(cluster, namespace, name, "Running", timeout=300)
    apiserver_proxy.blackhole()
    end_of_outage = time.monotonic() + 60
    wait_for(lambda: all(cluster.get("job", f"{n}-trainer", "-n", namespace)["status"].get("succeeded")
                         for n in names), timeout=60, message="training to finish while the operator is cut off")
    threading.Event().wait(max(0.0, end_of_outage - time.monotonic()))  # the fault's length
    apiserver_proxy.heal()
    healed = time.monotonic()
    took = []
    for name in names:
        wait_phase(cluster, namespace, name, "Succeeded", timeout=120)
        took.append(time.monotonic() - healed)
    duplicates = sum(n - 1 for n in jobs_per_owner(cluster, namespace).values())
    scenario = "API server black-holed for 60 s"
    ROWS.extend([(scenario, "Succeeded after healing (both jobs)", ", ".join(f"{t:.0f} s" for t in took)),
                 (scenario, "duplicate Jobs", str(duplicates))])
    assert duplicates == 0 and max(took) <= 60
