"""Kueue preemption with the real trainer: a high-priority FineTuneJob evicts a running low-priority
one, which checkpoints on SIGTERM, shows Preempted (never Failed), waits in its queue and resumes
from its checkpoint once the high-priority job is done. CPU-only jobs against a ClusterQueue quota
of one CPU: only one job runs at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helpers import wait_for
from tests.support.jobs import WatchHistory, event_reasons, ftj, published, train_steps, wait_phase

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
KUEUE = "kueue.x-k8s.io/v1beta2"


@pytest.fixture
def operator_env(real_trainer_env: dict[str, str]) -> dict[str, str]:
    return real_trainer_env


@pytest.fixture
def preempting_queue(cluster: Any, namespace: str) -> Iterator[str]:
    """A ClusterQueue of one CPU that preempts lower-priority workloads within it, its LocalQueue,
    and the WorkloadPriorityClasses <queue>-low (100) and <queue>-high (1000); all named after the
    namespace. Returns the queue's name."""
    name = namespace
    cluster.apply([
        {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": name}},
        {"apiVersion": KUEUE, "kind": "WorkloadPriorityClass", "metadata": {"name": f"{name}-low"}, "value": 100},
        {"apiVersion": KUEUE, "kind": "WorkloadPriorityClass", "metadata": {"name": f"{name}-high"}, "value": 1000},
        {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [
                {"name": name, "resources": [{"name": "cpu", "nominalQuota": 1},
                                             {"name": "memory", "nominalQuota": "64Gi"}]}]}]}},
    ])
    cluster.apply({"apiVersion": KUEUE, "kind": "LocalQueue", "metadata": {"name": name},
                   "spec": {"clusterQueue": name}}, namespace)
    wait_for(lambda: any(c["type"] == "Active" and c["status"] == "True" for c in
                         (cluster.get("clusterqueue", name).get("status") or {}).get("conditions") or []),
             timeout=60, message=f"ClusterQueue {name} active")
    yield name
    cluster.kubectl("delete", "localqueue", name, "-n", namespace, "--ignore-not-found", "--wait=false", check=False)
    cluster.kubectl("delete", "clusterqueue,resourceflavor", name, "--ignore-not-found", "--wait=false", check=False)
    cluster.kubectl("delete", "workloadpriorityclass", f"{name}-low", f"{name}-high", "--ignore-not-found",
                    check=False)


def phase_log(k8s_api: Any, namespace: str) -> WatchHistory:
    """Every (phase, reason, message) each FineTuneJob of a namespace took, in order."""
    from kubernetes import client

    def seen(obj: dict[str, Any]) -> tuple[str, str, str] | None:
        status = obj.get("status") or {}
        return (status["phase"], status.get("reason") or "", status.get("message") or "") \
            if status.get("phase") else None

    return WatchHistory(client.CustomObjectsApi(k8s_api).list_namespaced_custom_object, "kubetune.io", "v1alpha1",
                        namespace, "finetunejobs", value=seen, name=lambda obj: obj["metadata"]["name"])


def phase_sequence(log: WatchHistory, name: str) -> list[str]:
    """The phases in order, repeats collapsed."""
    out: list[str] = []
    for phase, _, _ in log.history(name):
        if not out or out[-1] != phase:
            out.append(phase)
    return out


def queued_job(name: str, queue: str, priority: str, steps: int) -> dict[str, Any]:
    """The quickstart, CPU-only with one CPU, in `queue` with a WorkloadPriorityClass; a checkpoint
    every 10 steps and every step in metrics.jsonl."""
    manifest: dict[str, Any] = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["training"].update(maxSteps=steps, evalEverySteps=steps, checkpointEverySteps=10, logEverySteps=1)
    manifest["spec"]["resources"] = {"gpus": 0, "cpu": "1", "sharedMemory": "256Mi"}
    manifest["spec"]["scheduling"] = {"queueName": queue, "workloadPriorityClassName": priority}
    return manifest


def test_a_preempted_job_checkpoints_waits_and_resumes_without_retraining(
        cluster: Any, namespace: str, s3_secret: None, minio_env: dict[str, str], operator: Any, k8s_api: Any,
        preempting_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = preempting_queue
    log = phase_log(k8s_api, namespace)
    try:
        cluster.apply(queued_job("low", queue, f"{queue}-low", steps=80), namespace)
        job = wait_for(lambda: cluster.get("jobs", "-n", namespace, "-l", "kubetune.io/job=low")["items"],
                       timeout=60, message="the low job's Job")[0]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == f"{queue}-low"

        def past_a_checkpoint() -> bool:
            assert "Failed" not in phase_sequence(log, "low"), log.history("low")
            status = ftj(cluster, namespace, "low").get("status") or {}
            assert status.get("phase") != "Succeeded", f"ended before it was preempted: {status}"
            return int((status.get("progress") or {}).get("step") or 0) >= 12

        wait_for(past_a_checkpoint, timeout=300, interval=0.2, message="the low job training past step 10")
        trained = int(ftj(cluster, namespace, "low")["status"]["progress"]["step"])
        cluster.apply(queued_job("high", queue, f"{queue}-high", steps=20), namespace)

        def preempted() -> bool:
            assert "Failed" not in phase_sequence(log, "low"), log.history("low")
            return "Preempted" in phase_sequence(log, "low")

        wait_for(preempted, timeout=120, interval=0.2, message="the low job Preempted")
        preemption = next(h for h in log.history("low") if h[0] == "Preempted")
        assert preemption[1] == "Preempted" and preemption[2].startswith("preempted by Kueue: "), preemption

        def high_succeeded() -> bool:
            low = phase_sequence(log, "low")
            assert "Failed" not in low and "Running" not in low[low.index("Preempted"):], log.history("low")
            return (ftj(cluster, namespace, "high").get("status") or {}).get("phase") == "Succeeded"

        wait_for(high_succeeded, timeout=300, interval=0.5, message="the high job Succeeded while the low one waits")

        def low_succeeded() -> bool:
            assert "Failed" not in phase_sequence(log, "low"), log.history("low")
            return (ftj(cluster, namespace, "low").get("status") or {}).get("phase") == "Succeeded"

        wait_for(low_succeeded, timeout=300, interval=0.5, message="the low job resumed and Succeeded")
        status = wait_phase(cluster, namespace, "low", "Succeeded")
        phases = phase_sequence(log, "low")
        # Pending in between: the new pod starting.
        after = [p for p in phases[phases.index("Preempted"):] if p != "Pending"]
        assert after == ["Preempted", "Queued", "Running", "Succeeded"], log.history("low")
        assert not {"Preempted", "Failed"} & set(phase_sequence(log, "high")), log.history("high")
        assert "Preempted" in event_reasons(cluster, namespace, "low")

        # Kueue's suspend of the Job is not a failed attempt: backoffLimit is untouched.
        job = cluster.get("job", "low-trainer", "-n", namespace)
        assert not job["status"].get("failed"), job["status"]

        # The resumed pod continued from the checkpoint written on SIGTERM, at or after the step the
        # status showed when the high job arrived (not from an older periodic checkpoint).
        pods = cluster.get("pods", "-n", namespace, "-l", "job-name=low-trainer")["items"]
        logs = "".join(cluster.kubectl("logs", "-n", namespace, p["metadata"]["name"]).stdout for p in pods)
        resumed = [int(line.rsplit("resuming from step ", 1)[1].split()[0]) for line in logs.splitlines()
                   if "resuming from step " in line]
        assert resumed and resumed[0] >= trained, (trained, logs[-3000:])
        requeued = next(h for h in log.history("low")[log.history("low").index(preemption):] if h[0] == "Queued")
        assert requeued[1] == "Requeued" and requeued[2].startswith("preempted by Kueue, waiting"), requeued
        said = [m for p, _, m in log.history("low") if p in ("Preempted", "Queued") and "checkpoint of step" in m]
        if said:  # the operator saw the stopped pod's summary before the pod went away
            assert f"checkpoint of step {resumed[0]} " in said[-1], said

        # The published history is one run: no step trained twice.
        steps = train_steps(published(status, minio_env, monkeypatch))
        assert steps == sorted(set(steps)) and steps[-1] == 80, steps
        assert resumed[0] + 1 in steps and resumed[0] in steps
    finally:
        log.stop()
