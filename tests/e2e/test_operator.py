"""Operator core on the local cluster: FineTuneJob → Job → pod on the GPU node → status.

These tests exercise the lifecycle with the TEST DOUBLE trainer (tests/e2e/fake_trainer.py);
the real trainer runs in test_quickstart.py.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helpers import wait_for
from tests.support.jobs import Signals, env, event_reasons, events, finetunejob, ftj, wait_phase

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]



def test_job_runs_on_the_gpu_node_and_succeeds(cluster: Any, namespace: str, operator: Any) -> None:
    cluster.apply(finetunejob("ok", resources={"gpus": 1, "sharedMemory": "64Mi"}), namespace)
    status = wait_phase(cluster, namespace, "ok", "Succeeded")

    job = cluster.get("job", "ok-trainer", "-n", namespace)
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [3, 6]
    pod = cluster.get("pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=ok-trainer")["items"][0]
    assert pod["spec"]["nodeName"] == "kubetune-local"

    assert status["jobName"] == "ok-trainer" and status["attempts"] == 1
    assert status["startTime"] <= status["completionTime"]
    assert status["metrics"]["evalLoss"] == 0.5 and status["progress"]["percent"] == 100
    uid = ftj(cluster, namespace, "ok")["metadata"]["uid"]
    assert status["artifacts"]["location"] == f"s3://runs/{namespace}/ok/{uid[:8]}/"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False"}
    assert status["observedGeneration"] == ftj(cluster, namespace, "ok")["metadata"]["generation"]
    wait_for(lambda: {"Created", "Succeeded"} <= set(event_reasons(cluster, namespace, "ok")),
             timeout=30, message="Created and Succeeded events")


def test_the_promotion_gate_sets_promotable_and_fail_job_fails_a_worse_model(cluster: Any, namespace: str,
                                                                            operator: Any) -> None:
    evaluation = json.dumps({"metrics": {"bleu": {"tuned": 31.5, "base": 12.0, "delta": 19.5, "samples": 64}},
                             "headline": "bleu 31.5 (base 12)"})
    metrics = {"metrics": ["bleu"]}
    cluster.apply(finetunejob("better", env=env(FAKE_EVALUATION=evaluation), evaluation={
        **metrics, "gate": {"rules": [{"metric": "bleu", "minImprovement": 10}]}}), namespace)
    cluster.apply(finetunejob("worse", env=env(FAKE_EVALUATION=evaluation), evaluation={
        **metrics, "gate": {"rules": [{"metric": "bleu", "min": 40}], "failJob": True}}), namespace)

    better = wait_phase(cluster, namespace, "better", "Succeeded")
    assert {c["type"]: c["status"] for c in better["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False", "Promotable": "True"}
    assert better["evaluation"]["gate"]["passed"] is True
    assert "bleu 31.5 (base 12)" in cluster.kubectl("get", "ftj", "better", "-n", namespace).stdout

    worse = wait_phase(cluster, namespace, "worse", "Failed")
    assert worse["reason"] == "EvaluationGateFailed" and "bleu 31.5 < min 40" in worse["message"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in worse["conditions"]}
    assert conditions["Promotable"] == ("False", "EvaluationGateFailed")
    assert conditions["Stalled"] == ("True", "EvaluationGateFailed") and conditions["Ready"][0] == "False"
    wait_for(lambda: any(e["reason"] == "Failed" and "EvaluationGateFailed" in e["message"]
                         for e in events(cluster, namespace, "worse")), timeout=30,
             message="the Failed event with the gate's reason")


def test_invalid_input_fails_at_once_with_the_trainer_message(cluster: Any, namespace: str, operator: Any) -> None:
    message = "s3://data/train.jsonl: missing column 'answer' (columns: prompt, output)"
    cluster.apply(finetunejob("bad-data", backoffLimit=3, env=env(FAKE_EXIT_CODE="3", FAKE_MESSAGE=message)),
                  namespace)
    status = wait_phase(cluster, namespace, "bad-data", "Failed")
    assert status["reason"] == "InvalidInput"
    assert message in status["message"]
    assert status["attempts"] == 1, "invalid input must not be retried"
    wait_for(lambda: "Failed" in event_reasons(cluster, namespace, "bad-data"), timeout=30, message="Failed event")


def test_generic_failure_is_retried_up_to_backoff_limit(cluster: Any, namespace: str, operator: Any,
                                                        signals: Signals) -> None:
    cluster.apply(finetunejob("flaky", backoffLimit=1, env=env(FAKE_EXIT_CODE="1", FAKE_MESSAGE="CUDA error",
                                                               FAKE_STARTED=signals.started("flaky"))), namespace)
    status = wait_phase(cluster, namespace, "flaky", "Failed", timeout=180)
    assert status["reason"] == "BackoffLimitExceeded"
    assert status["attempts"] == 2
    assert "CUDA error" in status["message"]
    assert signals.starts("flaky") == 2


def test_too_many_gpus_waits_with_the_scheduler_message(cluster: Any, namespace: str, operator: Any) -> None:
    cluster.apply(finetunejob("greedy", resources={"gpus": 64, "sharedMemory": "64Mi"}), namespace)
    status = wait_phase(cluster, namespace, "greedy", "Pending", reason="Unschedulable")
    assert "nvidia.com/gpu" in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Reconciling"]["status"] == "True" and conditions["Ready"]["status"] == "False"


def test_suspend_and_resume(cluster: Any, namespace: str, operator: Any, signals: Signals) -> None:
    cluster.apply(finetunejob("pausable", env=env(FAKE_WAIT_FOR=signals.gate("pausable"),
                                                  FAKE_STARTED=signals.started("pausable"))), namespace)
    wait_phase(cluster, namespace, "pausable", "Running")

    cluster.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_phase(cluster, namespace, "pausable", "Suspended")
    assert cluster.get("job", "pausable-trainer", "-n", namespace)["spec"]["suspend"] is True
    wait_for(lambda: not cluster.get("pods", "-n", namespace, "-l",
                                     "batch.kubernetes.io/job-name=pausable-trainer")["items"],
             timeout=60, message="pods of the suspended job to go away")

    signals.open("pausable")
    cluster.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_phase(cluster, namespace, "pausable", "Succeeded")
    assert signals.starts("pausable") == 2
    wait_for(lambda: {"Suspended", "Resumed"} <= set(event_reasons(cluster, namespace, "pausable")),
             timeout=30, message="Suspended and Resumed events")


def test_operator_killed_mid_run_adopts_the_job(cluster: Any, namespace: str, operator: Any,
                                                signals: Signals) -> None:
    cluster.apply(finetunejob("survivor", env=env(FAKE_WAIT_FOR=signals.gate("survivor"))), namespace)
    wait_phase(cluster, namespace, "survivor", "Running")

    operator.stop(kill=True)
    signals.open("survivor")
    wait_for(lambda: cluster.get("job", "survivor-trainer", "-n", namespace)["status"].get("succeeded"),
             timeout=120, message="the Job to complete while the operator is down")
    assert ftj(cluster, namespace, "survivor")["status"]["phase"] == "Running"

    operator.start()
    status = wait_phase(cluster, namespace, "survivor", "Succeeded")
    assert status["attempts"] == 1
    jobs = cluster.get("jobs", "-n", namespace)["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["survivor-trainer"]


def test_operator_restarted_before_the_job_exists_starts_the_trainer_once(cluster: Any, namespace: str,
                                                                         operator: Any, signals: Signals) -> None:
    operator.stop(kill=True)
    cluster.apply(finetunejob("late", env=env(FAKE_STARTED=signals.started("late"),
                                              FAKE_WAIT_FOR=signals.gate("late"))), namespace)
    operator.start()
    job_uid = wait_for(lambda: cluster.get("job", "late-trainer", "-n", namespace)["metadata"]["uid"],
                       timeout=60, message="the Job")
    operator.stop(kill=True)
    operator.start()
    wait_phase(cluster, namespace, "late", "Running")
    operator.stop(kill=True)
    operator.start()
    signals.open("late")
    status = wait_phase(cluster, namespace, "late", "Succeeded")
    # Neither deleted and re-created nor run twice by a restarted operator.
    assert cluster.get("job", "late-trainer", "-n", namespace)["metadata"]["uid"] == job_uid
    assert signals.starts("late") == 1 and status["attempts"] == 1


NO_GPU_MEMORY = {"gpus": 0, "sharedMemory": "64Mi", "gpuMemory": "0Gi"}  # schema-valid, operator-invalid


def test_schema_valid_but_invalid_spec_fails_with_invalid_spec(cluster: Any, namespace: str,
                                                                operator: Any) -> None:
    # The schema takes the quantity's form; only the operator knows that no GPU has 0 bytes.
    cluster.apply(finetunejob("zero-gpu-memory", resources=NO_GPU_MEMORY), namespace)
    status = wait_phase(cluster, namespace, "zero-gpu-memory", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "spec.resources.gpuMemory" in status["message"] and "must be more than 0" in status["message"]
    assert cluster.get("jobs", "-n", namespace)["items"] == []
    wait_for(lambda: any(e["reason"] == "Failed" and e["message"].startswith("InvalidSpec: spec.resources.gpuMemory")
                         for e in events(cluster, namespace, "zero-gpu-memory")),
             timeout=30, message="a Failed event naming InvalidSpec and the field")


def test_missing_secret_waits_then_proceeds(cluster: Any, namespace: str, operator: Any) -> None:
    cluster.apply(finetunejob("needs-creds", storage={"secretRef": {"name": "s3-creds"}}), namespace)
    # The operator never reads Secrets: the kubelet's report that the pod cannot start says it.
    status = wait_phase(cluster, namespace, "needs-creds", "Pending", reason="MissingDependency")
    assert "Secret s3-creds" in status["message"]

    secret_value = "kt-secret-9f3c2a"
    cluster.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
                    "--from-literal=AWS_ACCESS_KEY_ID=id", f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_value}")
    wait_phase(cluster, namespace, "needs-creds", "Succeeded", timeout=180)
    seen = [operator.logs(), json.dumps(cluster.get("ftj,jobs,configmaps,events", "-n", namespace))]
    assert all(secret_value not in text for text in seen), "a credential leaked into logs or objects"


def test_delete_removes_job_pods_and_config(cluster: Any, namespace: str, operator: Any, signals: Signals) -> None:
    cluster.apply(finetunejob("doomed", env=env(FAKE_WAIT_FOR=signals.gate("never"))), namespace)
    wait_phase(cluster, namespace, "doomed", "Running")

    def children() -> list[str]:
        found = []
        for kind in ("jobs", "pods", "configmaps", "networkpolicies", "secrets", "services"):
            items = cluster.get(kind, "-n", namespace, "-l", "kubetune.io/job=doomed")["items"]
            found += [kind for _ in items]
        return sorted(found)

    # a single-node run has no Service; its report Secret exists because the operator reports
    assert children() == ["configmaps", "jobs", "networkpolicies", "pods", "secrets"]
    cluster.kubectl("delete", "ftj", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: children() == [], timeout=120, message="children to be garbage-collected")


def test_clean_up_after_the_end_removes_only_the_jobs_own_children(cluster: Any, namespace: str,
                                                                    operator: Any) -> None:
    # A Service named like the job's children, made by someone else (a single-node job makes none).
    stranger = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tidy-trainer"},
                "spec": {"ports": [{"port": 80}], "selector": {"app": "other"}}}
    cluster.apply(stranger, namespace)
    cluster.apply(finetunejob("tidy", ttlSecondsAfterFinished=0), namespace)
    wait_for(lambda: (ftj(cluster, namespace, "tidy").get("status") or {}).get("cleanupTime"), timeout=120,
             message="the children removed after the end")
    for kind, name in (("job", "tidy-trainer"), ("configmap", "tidy-config"), ("networkpolicy", "tidy-trainer")):
        wait_for(lambda kind=kind, name=name: cluster.kubectl("get", kind, name, "-n", namespace,
                                                              check=False).returncode != 0,
                 timeout=60, message=f"the job's {kind} deleted")
    assert cluster.get("service", "tidy-trainer", "-n", namespace)["spec"]["selector"] == {"app": "other"}


def test_restricted_pod_security_accepts_the_training_pod(cluster: Any, namespace: str, operator: Any) -> None:
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    cluster.apply(finetunejob("restricted"), namespace)
    wait_phase(cluster, namespace, "restricted", "Succeeded")


def test_recreated_job_with_the_same_name_runs_on_its_own(cluster: Any, namespace: str, operator: Any,
                                                           signals: Signals) -> None:
    cluster.apply(finetunejob("again", env=env(FAKE_WAIT_FOR=signals.gate("never"))), namespace)
    wait_phase(cluster, namespace, "again", "Running")
    first_uid = ftj(cluster, namespace, "again")["metadata"]["uid"]
    cluster.kubectl("delete", "ftj", "again", "-n", namespace, "--wait=false")
    wait_for(lambda: cluster.kubectl("get", "ftj", "again", "-n", namespace, check=False).returncode != 0,
             timeout=60, message="the first FineTuneJob to be deleted")

    cluster.apply(finetunejob("again"), namespace)
    status = wait_phase(cluster, namespace, "again", "Succeeded", timeout=180)
    second_uid = ftj(cluster, namespace, "again")["metadata"]["uid"]
    assert second_uid != first_uid
    job = cluster.get("job", "again-trainer", "-n", namespace)
    assert job["metadata"]["ownerReferences"][0]["uid"] == second_uid
    assert status["attempts"] == 1
    assert status["artifacts"]["location"].endswith(f"/again/{second_uid[:8]}/")


def test_a_job_the_api_server_rejects_says_why(cluster: Any, namespace: str, operator: Any) -> None:
    cluster.apply(finetunejob("bad-gpu", resources={"gpus": 1, "gpuResourceName": "gpu"}), namespace)
    status = wait_phase(cluster, namespace, "bad-gpu", "Pending", reason="JobRejected")
    assert "the API server rejected" in status["message"] and "gpu" in status["message"]
    assert cluster.get("jobs", "-n", namespace)["items"] == []
    wait_for(lambda: any(e["reason"] == "JobRejected" and e["type"] == "Warning"
                         for e in events(cluster, namespace, "bad-gpu")),
             timeout=30, message="a JobRejected warning event")


def test_a_secret_without_the_named_key_shows_the_kubelet_reason(cluster: Any, namespace: str,
                                                                 operator: Any) -> None:
    cluster.kubectl("create", "secret", "generic", "hf", "-n", namespace, "--from-literal=other=x")
    cluster.apply(finetunejob("no-key", env=[{"name": "HF_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "hf", "key": "token"}}}]), namespace)
    status = wait_phase(cluster, namespace, "no-key", "Pending", reason="CreateContainerConfigError")
    assert "the training pod cannot start" in status["message"] and "token" in status["message"]


def jobs_by_phase(operator: Any) -> dict[str, float]:
    with urllib.request.urlopen(f"{operator.report_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r'^kubetune_finetunejobs\{phase="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {phase: float(value) for phase, value in found}


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024  # type: ignore[union-attr]


def test_deleted_jobs_are_forgotten(cluster: Any, namespace: str, operator: Any) -> None:
    count = 200
    rss = []
    for round_ in range(2):
        # Schema-valid, operator-invalid: each one is reconciled, counted and fails without a Job.
        manifests = [finetunejob(f"many-{round_}-{i}", resources=NO_GPU_MEMORY) for i in range(count)]
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(manifests))
        wait_for(lambda: jobs_by_phase(operator).get("Failed") == count, timeout=300,
                 message=f"{count} FineTuneJobs counted as Failed")
        cluster.kubectl("delete", "ftj", "--all", "-n", namespace, "--wait=true", "--timeout=120s")
        wait_for(lambda: set(jobs_by_phase(operator).values()) == {0.0}, timeout=60,
                 message="the jobs-by-phase gauge back at 0 after the jobs were deleted")
        rss.append(rss_bytes(operator.process.pid))
    print(f"operator RSS after {count} jobs created and deleted: {rss[0] / 2**20:.0f} MiB; "
          f"after {2 * count}: {rss[1] / 2**20:.0f} MiB")
    assert rss[1] <= rss[0] * 1.1 + 16 * 2**20, "the operator keeps memory for deleted jobs"


def test_a_burst_of_jobs_gets_exactly_one_job_each_and_all_succeed(cluster: Any, namespace: str,
                                                                   operator: Any) -> None:
    """50 FineTuneJobs applied at once, reconciled from several events each (their own, their Job's,
    their Pod's, the timers) while the watch caches lag: still one Job and one Created event each."""
    count = 50
    names = sorted(f"burst-{i:02d}" for i in range(count))
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=yaml.safe_dump_all([finetunejob(name) for name in names]))

    def all_succeeded() -> bool:
        items = cluster.get("finetunejobs", "-n", namespace)["items"]
        return len(items) == count and all((i.get("status") or {}).get("phase") == "Succeeded" for i in items)

    wait_for(all_succeeded, timeout=600, message=f"{count} FineTuneJobs Succeeded")
    jobs = cluster.get("jobs", "-n", namespace)["items"]
    assert sorted(j["metadata"]["annotations"]["kubetune.io/finetunejob"] for j in jobs) == names

    def one_attempt_each() -> bool:  # the Job controller's counters may trail the Complete condition
        jobs = cluster.get("jobs", "-n", namespace)["items"]
        return all((j["status"].get("succeeded"), j["status"].get("failed", 0)) == (1, 0) for j in jobs)

    wait_for(one_attempt_each, timeout=60, message="every Job: one pod, succeeded, none failed")
    created = [e["involvedObject"]["name"] for e in cluster.get("events", "-n", namespace)["items"]
               if e["involvedObject"]["kind"] == "FineTuneJob" and e["reason"] == "Created"]
    assert sorted(created) == names, "a FineTuneJob got its Job created more than once"


ENV_RULE = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/env/items/x-kubernetes-validations"


def test_a_running_job_whose_spec_stops_validating_is_followed_to_its_end(
        cluster: Any, namespace: str, operator: Any, signals: Signals) -> None:
    release = signals.gate("grandfathered")
    cluster.apply(finetunejob("grandfathered", env=env(FAKE_WAIT_FOR=release)), namespace)
    wait_phase(cluster, namespace, "grandfathered", "Running")
    # An older CRD without the reserved-name rule lets a spec in that this operator rejects: what
    # an upgrade that tightens validation leaves behind.
    cluster.kubectl("patch", "crd", "finetunejobs.kubetune.io", "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": ENV_RULE}]))
    try:
        patch = json.dumps({"spec": {"env": [*env(FAKE_WAIT_FOR=release), {"name": "KUBETUNE_X", "value": "1"}]}})
        wait_for(lambda: cluster.kubectl("patch", "ftj", "grandfathered", "-n", namespace, "--type=merge", "-p", patch,
                                         check=False).returncode == 0, timeout=60, message="the looser CRD in force")
    finally:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    wait_for(lambda: "no longer validates" in operator.logs(), timeout=60, message="the operator to notice")
    assert ftj(cluster, namespace, "grandfathered")["status"]["phase"] == "Running"
    signals.open("grandfathered")
    status = wait_phase(cluster, namespace, "grandfathered", "Succeeded")
    assert status["reason"] == "Succeeded" and status["metrics"]["evalLoss"] == 0.5


def test_a_pod_the_job_controller_cannot_create_shows_why(cluster: Any, namespace: str, operator: Any) -> None:
    # A ResourceQuota refuses the pod (not the Job): the Job controller says so only in an Event.
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
             "spec": {"hard": {"pods": "0"}}}
    cluster.apply(quota, namespace)
    cluster.apply(finetunejob("refused"), namespace)
    status = wait_phase(cluster, namespace, "refused", "Pending", reason="PodRejected")
    assert status["message"].startswith("the Job controller cannot create the training pod: ")
    assert "exceeded quota: no-pods" in status["message"]
    wait_for(lambda: any(e["reason"] == "PodRejected" and e["type"] == "Warning"
                         for e in events(cluster, namespace, "refused")), timeout=30, message="a PodRejected event")
