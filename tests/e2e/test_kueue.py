"""FineTuneJobs queued by the real Kueue (hack/build-kueue.sh) on the local cluster, whose node has
two GPUs. The TEST DOUBLE trainer (tests/e2e/fake_trainer.py) holds each pod running until the test
releases it: admission, not training, is the point here."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.helpers import wait_for
from tests.support.jobs import Signals, WatchHistory, env, event_reasons, finetunejob, ftj, wait_phase

pytestmark = pytest.mark.e2e
KUEUE = "kueue.x-k8s.io/v1beta2"
NO_QUOTA = re.compile(r"insufficient unused quota for nvidia\.com/gpu")



@pytest.fixture
def queues(cluster: Any, namespace: str) -> Iterator[Callable[[int], str]]:
    """make(gpus): a ResourceFlavor, a ClusterQueue with `gpus` of nvidia.com/gpu quota (CPU and
    memory ample) and a LocalQueue in the test's namespace; returns the LocalQueue's name. The
    cluster-scoped objects are named after the namespace and removed afterwards."""
    made: list[str] = []

    def make(gpus: int) -> str:
        name = f"{namespace}-{len(made)}"
        cluster.apply([
            {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": name}},
            {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "queueingStrategy": "BestEffortFIFO",
                "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [
                    {"name": name, "resources": [{"name": "cpu", "nominalQuota": 64},
                                                 {"name": "memory", "nominalQuota": "256Gi"},
                                                 {"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}},
        ])
        cluster.apply({"apiVersion": KUEUE, "kind": "LocalQueue", "metadata": {"name": name},
                       "spec": {"clusterQueue": name}}, namespace)
        made.append(name)
        wait_for(lambda: any(c["type"] == "Active" and c["status"] == "True" for c in
                             (cluster.get("clusterqueue", name).get("status") or {}).get("conditions") or []),
                 timeout=60, message=f"ClusterQueue {name} active")
        return name

    yield make
    for name in made:
        cluster.kubectl("delete", "localqueue", name, "-n", namespace, "--ignore-not-found", "--wait=false",
                        check=False)
        cluster.kubectl("delete", "clusterqueue,resourceflavor", name, "--ignore-not-found", "--wait=false",
                        check=False)


def workload_of(cluster: Any, namespace: str, job_name: str) -> dict[str, Any]:
    uid = cluster.get("job", job_name, "-n", namespace)["metadata"]["uid"]
    items = cluster.get("workloads.kueue.x-k8s.io", "-n", namespace, "-l", f"kueue.x-k8s.io/job-uid={uid}")["items"]
    assert len(items) == 1, [w["metadata"]["name"] for w in items]
    return dict(items[0])


def full_reconciles(operator: Any) -> float:
    with urllib.request.urlopen(f"{operator.report_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r'^kubetune_reconciles_total\{kind="full"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_kueue_is_served(cluster: Any) -> None:
    names = cluster.kubectl("api-resources", "--api-group=kueue.x-k8s.io", "-o", "name").stdout.split()
    assert {"clusterqueues.kueue.x-k8s.io", "localqueues.kueue.x-k8s.io", "workloads.kueue.x-k8s.io"} <= set(names)


def test_five_one_gpu_jobs_run_two_at_a_time_in_a_two_gpu_queue(cluster: Any, namespace: str, operator: Any,
                                                                queues: Callable[[int], str],
                                                                signals: Signals) -> None:
    queue = queues(2)
    names = [f"gpu-{i}" for i in range(5)]
    cluster.apply([finetunejob(name, resources={"gpus": 1, "sharedMemory": "64Mi"}, scheduling={"queueName": queue},
                               env=env(FAKE_WAIT_FOR=signals.gate(name))) for name in names], namespace)
    ever_running: list[str] = []  # in the order they started
    queued_messages: dict[str, str] = {}

    def observe() -> dict[str, dict[str, Any]]:
        """One look at every FineTuneJob; at most two may be training at any moment."""
        statuses = {i["metadata"]["name"]: i.get("status") or {}
                    for i in cluster.get("finetunejobs", "-n", namespace)["items"]}
        # Running/Finishing: the trainer exited and the Job is completing; Kueue may already have
        # handed its GPU to the next job.
        training = sorted(n for n, s in statuses.items()
                          if s.get("phase") == "Running" and s.get("reason") != "Finishing")
        assert len(training) <= 2, f"{len(training)} FineTuneJobs Running in a queue with 2 GPUs: {statuses}"
        ever_running.extend(n for n in training if n not in ever_running)
        for n, s in statuses.items():
            if s.get("phase") == "Queued" and NO_QUOTA.search(s.get("message") or ""):
                queued_messages[n] = s["message"]
        return statuses

    def settled_two_running_three_queued() -> bool:
        statuses = observe()
        queued = [n for n, s in statuses.items() if s.get("phase") == "Queued" and n in queued_messages]
        return len(ever_running) == 2 and len(queued) == 3

    wait_for(settled_two_running_three_queued, timeout=120,
             message="two FineTuneJobs Running and three Queued with Kueue's reason")
    waiting = sorted(set(names) - set(ever_running))
    for name in waiting:
        assert "waiting for Kueue to admit the job: couldn't assign flavors" in queued_messages[name], queued_messages
        assert ftj(cluster, namespace, name)["status"]["reason"] == "WaitingForAdmission"

    # Release the running jobs one at a time: each finished one frees a GPU for the next in line.
    released: list[str] = []
    while len(released) < len(names):
        name = next(n for n in ever_running if n not in released)
        signals.open(name)
        released.append(name)
        started = len(ever_running)
        if started < len(names):
            wait_for(lambda: observe() is not None and len(ever_running) > started, timeout=120,  # noqa: B023
                     message=f"the next queued job to start after {name} finished")

    def all_succeeded() -> bool:
        return all(s.get("phase") == "Succeeded" for s in observe().values())

    wait_for(all_succeeded, timeout=120, message="all five FineTuneJobs Succeeded")
    assert sorted(ever_running) == names
    assert all("Queued" in event_reasons(cluster, namespace, n) for n in waiting)


def test_suspend_of_a_queued_job_goes_through_its_workload(cluster: Any, namespace: str, operator: Any,
                                                           queues: Callable[[int], str], k8s_api: Any,
                                                           signals: Signals) -> None:
    queue = queues(1)
    from kubernetes import client

    # Every value of spec.suspend each training Job took, in order: the whole history, not samples.
    jobs = WatchHistory(client.BatchV1Api(k8s_api).list_namespaced_job, namespace,
                        value=lambda job: bool(job.spec.suspend), name=lambda job: job.metadata.name, timeout_s=600)
    try:
        for name in ("holder", "waiter"):
            cluster.apply(finetunejob(name, resources={"gpus": 1, "sharedMemory": "64Mi"},
                                      scheduling={"queueName": queue},
                                      env=env(FAKE_WAIT_FOR=signals.gate(name))), namespace)
            if name == "holder":
                wait_phase(cluster, namespace, "holder", "Running")
        status = wait_for(lambda: (s := ftj(cluster, namespace, "waiter").get("status") or {}).get("phase") == "Queued"
                          and NO_QUOTA.search(s.get("message") or "") and s, timeout=60,
                          message="the waiter Queued with Kueue's reason")
        assert status["reason"] == "WaitingForAdmission"

        # A job waiting in the queue: its Workload is deactivated; its Job stays suspended.
        suspend = json.dumps({"spec": {"suspend": True}})
        cluster.kubectl("patch", "ftj", "waiter", "-n", namespace, "--type=merge", "-p", suspend)
        wait_phase(cluster, namespace, "waiter", "Suspended")
        assert workload_of(cluster, namespace, "waiter-trainer")["spec"]["active"] is False

        # An admitted, running job: Kueue evicts it, suspends its Job and its pod goes away.
        cluster.kubectl("patch", "ftj", "holder", "-n", namespace, "--type=merge", "-p", suspend)
        wait_phase(cluster, namespace, "holder", "Suspended")
        assert workload_of(cluster, namespace, "holder-trainer")["spec"]["active"] is False
        wait_for(lambda: not cluster.get("pods", "-n", namespace, "-l",
                                         "batch.kubernetes.io/job-name=holder-trainer")["items"],
                 timeout=60, message="the evicted job's pod to go away")

        # Settled: over four more full reconciles of these jobs (the resync runs every 5 s), neither
        # the operator nor Kueue writes either Job's spec (its generation; the Job controller may
        # still write its status).
        def generations() -> dict[str, int]:
            return {n: cluster.get("job", f"{n}-trainer", "-n", namespace)["metadata"]["generation"]
                    for n in ("holder", "waiter")}

        settled = generations()
        before = full_reconciles(operator)
        wait_for(lambda: full_reconciles(operator) >= before + 4, timeout=60, message="four full reconciles")
        assert generations() == settled, "the spec of a suspended queued Job kept changing"

        # Resume: both Workloads are active again and the jobs run, one at a time, to the end.
        for name in ("holder", "waiter"):
            signals.open(name)
        resume = json.dumps({"spec": {"suspend": False}})
        for name in ("waiter", "holder"):
            cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", resume)
        for name in ("waiter", "holder"):
            wait_phase(cluster, namespace, name, "Succeeded", timeout=120)
            assert workload_of(cluster, namespace, f"{name}-trainer")["spec"]["active"] is True
            assert {"Suspended", "Resumed"} <= set(event_reasons(cluster, namespace, name))
        # Job.spec.suspend, every value it took: created suspended, admitted, evicted, admitted again
        # (the holder); created suspended, admitted (the waiter). No flip-flop between two writers.
        assert jobs.history("holder-trainer") == [True, False, True, False]
        assert jobs.history("waiter-trainer") == [True, False]
    finally:
        jobs.stop()


def test_a_decoy_workload_with_the_jobs_label_is_never_taken_for_its_own(cluster: Any, namespace: str,
                                                                         operator: Any,
                                                                         queues: Callable[[int], str]) -> None:
    queue = queues(0)  # nothing is admitted: the job waits in its queue
    cluster.apply(finetunejob("waiter", resources={"gpus": 1, "sharedMemory": "64Mi"},
                              scheduling={"queueName": queue}), namespace)
    wait_phase(cluster, namespace, "waiter", "Queued")
    real = workload_of(cluster, namespace, "waiter-trainer")
    uid = cluster.get("job", "waiter-trainer", "-n", namespace)["metadata"]["uid"]
    # Anyone who may create Workloads in the namespace can set Kueue's job-uid label on one; this one
    # is the newest, or of the same second and listed last.
    decoy = {"apiVersion": KUEUE, "kind": "Workload",
             "metadata": {"name": "zz-decoy", "labels": {"kueue.x-k8s.io/job-uid": uid}},
             "spec": {"queueName": queue, "active": True, "podSets": [{"name": "main", "count": 1, "template": {
                 "spec": {"restartPolicy": "Never", "containers": [
                     {"name": "c", "image": "decoy", "resources": {"requests": {"cpu": "1"}}}]}}}]}}
    cluster.apply(decoy, namespace)
    cluster.kubectl("patch", "ftj", "waiter", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"suspend": True}}))
    wait_phase(cluster, namespace, "waiter", "Suspended")
    assert cluster.get("workload", real["metadata"]["name"], "-n", namespace)["spec"]["active"] is False
    assert cluster.get("workload", "zz-decoy", "-n", namespace)["spec"]["active"] is True
