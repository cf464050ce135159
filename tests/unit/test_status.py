"""status.py: the phase, reason and conditions for each Job/Pod situation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune import status
from kubetune.api import Phase

NOW = "2026-01-01T00:10:00Z"



def built(observed: status.Observed, **arguments: Any) -> dict[str, Any]:
    """The status build_status makes, as the API server gets it."""
    return status.as_patch(status.build_status(observed, **arguments))


def job(*conditions: tuple[str, str], suspend: bool = False, **counts: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "j"},
        "spec": {"suspend": suspend},
        "status": {
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": t, "status": "True", "reason": r, "message": f"{r} message",
                            "lastTransitionTime": "2026-01-01T00:05:00Z"} for t, r in conditions],
            **counts,
        },
    }


def pod(phase: str = "Pending", *, created: str = "2026-01-01T00:00:00Z", scheduled: tuple[str, str] | None = None,
        waiting: str | None = None, message: str | None = None,
        terminated: dict[str, Any] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting, "message": message or f"{waiting}: registry.example/x not found"}
    if terminated is not None:
        state["terminated"] = terminated
    conditions = []
    if scheduled:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": scheduled[0], "message": scheduled[1]})
    return {
        "metadata": {"name": "p", "creationTimestamp": created},
        "status": {"phase": phase, "conditions": conditions,
                   "containerStatuses": [{"name": "trainer", "state": state}] if state else []},
    }


SUMMARY = json.dumps({"step": 40, "totalSteps": 40, "epoch": 2.0,
                      "metrics": {"trainLoss": 0.5, "evalLoss": 0.7, "perplexity": 2.01},
                      "artifacts": {"location": "s3://runs/ns/q/", "files": 9, "totalBytes": 1234}})

CASES = [
    # (id, job, pods, suspend, queued, phase, reason, words in message)
    ("no job yet", None, [], False, False, "Pending", "Creating", "creating"),
    ("pod unschedulable", job(active=1),
     [pod(scheduled=("Unschedulable", "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."))],
     False, False, "Pending", "Unschedulable", "Insufficient nvidia.com/gpu"),
    ("image pull error", job(active=1), [pod(waiting="ImagePullBackOff")], False, False,
     "Pending", "ImagePullError", "cannot pull the trainer image"),
    ("pod starting", job(active=1), [pod()], False, False, "Pending", "Starting", "starting"),
    ("running", job(active=1), [pod("Running")], False, False, "Running", "Training", "running"),
    ("pod done, job not yet complete", job(succeeded=1), [pod("Succeeded", terminated={"exitCode": 0})],
     False, False, "Running", "Finishing", "finished"),
    ("suspended", job(suspend=True), [], True, False, "Suspended", "Suspended", "spec.suspend=false"),
    ("waiting for kueue", job(suspend=True), [], False, True, "Queued", "WaitingForAdmission", "Kueue"),
    ("succeeded", job(("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "CompletionsReached"), succeeded=1),
     [pod("Succeeded", terminated={"exitCode": 0, "message": SUMMARY})], False, False,
     "Succeeded", "Succeeded", "finished"),
    ("invalid input", job(("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy"), failed=1),
     [pod("Failed", terminated={"exitCode": 3, "message": json.dumps(
         {"error": "s3://d/train.csv: missing column 'answer' (columns: prompt, output)", "exitCode": 3})})],
     False, False, "Failed", "InvalidInput", "missing column 'answer'"),
    ("oom killed", job(("Failed", "BackoffLimitExceeded"), failed=1),
     [pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})], False, False,
     "Failed", "BackoffLimitExceeded", "out of memory"),
    ("backoff limit", job(("Failed", "BackoffLimitExceeded"), failed=2),
     [pod("Failed", created="2026-01-01T00:01:00Z", terminated={"exitCode": 1, "message": "CUDA error"}),
      pod("Failed", terminated={"exitCode": 1, "message": "CUDA error"})], False, False,
     "Failed", "BackoffLimitExceeded", "failed 2 times"),
    ("deadline", job(("Failed", "DeadlineExceeded"), failed=1), [], False, False,
     "Failed", "DeadlineExceeded", "activeDeadlineSeconds"),
    ("retrying", job(failed=1), [pod("Failed", terminated={"exitCode": 1, "message": "NCCL timeout"})],
     False, False, "Pending", "Retrying", "NCCL timeout"),
    ("interrupted", job(failed=1), [pod("Failed", terminated={"exitCode": 143})], False, False,
     "Pending", "Retrying", "stopped by SIGTERM after checkpointing"),
    ("secret without the key", job(active=1), [pod(waiting="CreateContainerConfigError")], False, False,
     "Pending", "CreateContainerConfigError", "the training pod cannot start"),
    ("secret missing", job(active=1), [pod(waiting="CreateContainerConfigError", message='secret "s3" not found')],
     False, False, "Pending", "MissingDependency", "waiting for Secret s3"),
    ("crash loop", job(active=1), [pod(waiting="CrashLoopBackOff")], False, False,
     "Pending", "CrashLoopBackOff", "registry.example/x not found"),
    ("out of memory", job(("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy"), failed=1),
     [pod("Failed", terminated={"exitCode": 6, "message": json.dumps(
         {"error": "CUDA out of memory; try quantization int4", "exitCode": 6})})],
     False, False, "Failed", "OutOfMemory", "try quantization int4"),
    ("store outage", job(failed=1), [pod("Failed", terminated={"exitCode": 5, "message": "s3 unreachable"})],
     False, False, "Pending", "Retrying", "s3 unreachable"),
    ("registry outage", job(failed=1), [pod("Failed", terminated={"exitCode": 7, "message": "registry unreachable"})],
     False, False, "Pending", "Retrying", "registry unreachable"),
    ("source unavailable", job(("Failed", "BackoffLimitExceeded"), failed=1),
     [pod("Failed", terminated={"exitCode": 4, "message": "hf://x/y: offline"})], False, False,
     "Failed", "BackoffLimitExceeded", "hf://x/y: offline"),
]


@pytest.mark.parametrize(("job_obj", "pods", "suspend", "queued", "phase", "reason", "words"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_observe(job_obj: dict[str, Any] | None, pods: list[dict[str, Any]], suspend: bool, queued: bool,
                 phase: str, reason: str, words: str) -> None:
    observed = status.observe(job_obj, pods, suspend=suspend, queued=queued)
    assert (observed.phase, observed.reason) == (phase, reason)
    assert words in observed.message


def conditions_by_type(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in result["conditions"]}


@pytest.mark.parametrize(("phase", "ready", "reconciling", "stalled"), [
    ("Pending", "False", "True", "False"),
    ("Running", "False", "True", "False"),
    ("Succeeded", "True", "False", "False"),
    ("Failed", "False", "False", "True"),
    ("Suspended", "False", "False", "False"),
])
def test_kstatus_conditions(phase: str, ready: str, reconciling: str, stalled: str) -> None:
    result = built(status.Observed(Phase(phase), "R", "m"), previous={}, generation=3, job_name="j",
                                 now=NOW)
    got = conditions_by_type(result)
    assert (got["Ready"]["status"], got["Reconciling"]["status"], got["Stalled"]["status"]) == (
        ready, reconciling, stalled)
    assert all(c["observedGeneration"] == 3 for c in result["conditions"])
    assert result["observedGeneration"] == 3


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    first = built(status.Observed(Phase.RUNNING, "Training", "m"), previous={}, generation=1,
                                job_name="j", now="2026-01-01T00:00:00Z")
    second = built(status.Observed(Phase.RUNNING, "Training", "m"), previous=first, generation=1,
                                 job_name="j", now="2026-01-01T00:09:00Z")
    assert conditions_by_type(second)["Reconciling"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    third = built(status.Observed(Phase.SUCCEEDED, "Succeeded", "m"), previous=second, generation=1,
                                job_name="j", now="2026-01-01T00:10:00Z")
    assert conditions_by_type(third)["Ready"]["lastTransitionTime"] == "2026-01-01T00:10:00Z"


def test_success_summary_completes_the_status() -> None:
    observed = status.observe(job(("Complete", "CompletionsReached"), succeeded=1),
                              [pod("Succeeded", terminated={"exitCode": 0, "message": SUMMARY})],
                              suspend=False, queued=False)
    result = built(observed, previous={}, generation=1, job_name="j", now=NOW)
    assert result["progress"]["percent"] == 100 and result["progress"]["step"] == 40
    assert result["metrics"]["evalLoss"] == 0.7
    assert result["artifacts"]["location"] == "s3://runs/ns/q/"
    assert result["completionTime"] == "2026-01-01T00:05:00Z"
    assert result["attempts"] == 1


def test_the_lineage_gets_the_image_the_node_ran_by_digest() -> None:
    """The trainer names its image as the Job does; the pod's imageID (the digest the kubelet pulled)
    joins its lineage in status. A summary without a lineage gets none invented."""
    digest = "registry.example/kubetune-trainer@sha256:" + "b" * 64
    image = "registry.example/kubetune-trainer:1"
    with_lineage = json.dumps({**json.loads(SUMMARY), "artifacts": {
        "location": "s3://runs/ns/q/", "lineage": {"image": image, "configSha256": "c" * 64}}})
    done = pod("Succeeded", terminated={"exitCode": 0, "message": with_lineage})
    done["status"]["containerStatuses"][0]["imageID"] = digest
    observed = status.observe(job(("Complete", "CompletionsReached"), succeeded=1), [done], suspend=False,
                              queued=False)
    lineage = built(observed, previous={}, generation=1, job_name="j", now=NOW)["artifacts"]["lineage"]
    assert lineage == {"image": image, "imageID": digest, "configSha256": "c" * 64, "data": []}

    plain = pod("Succeeded", terminated={"exitCode": 0, "message": SUMMARY})
    plain["status"]["containerStatuses"][0]["imageID"] = digest
    observed = status.observe(job(("Complete", "CompletionsReached"), succeeded=1), [plain], suspend=False,
                              queued=False)
    assert "lineage" not in built(observed, previous={}, generation=1, job_name="j", now=NOW)["artifacts"]


def test_times_are_written_as_kubernetes_writes_them() -> None:
    observed = status.Observed(Phase.SUCCEEDED, "Succeeded", "m", start_time="2026-01-01T00:00:00+00:00",
                               completion_time="2026-01-01T01:00:00+00:00")
    result = built(observed, previous={}, generation=1, job_name="j", now=NOW)
    assert (result["startTime"], result["completionTime"]) == ("2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")


def test_start_time_is_kept_from_the_previous_status() -> None:
    result = built(status.Observed(Phase.RUNNING, "Training", "m", start_time="2026-01-02T00:00:00Z"),
                                 previous={"startTime": "2026-01-01T00:00:00Z"}, generation=1, job_name="j",
                                 now=NOW)
    assert result["startTime"] == "2026-01-01T00:00:00Z"


def test_invalid_spec_status_is_stalled() -> None:
    result = status.as_patch(status.refused_status("InvalidSpec", "spec.training.batchSize: too big", previous={},
                                                   generation=2, now=NOW))
    assert (result["phase"], result["reason"]) == ("Failed", "InvalidSpec")
    assert conditions_by_type(result)["Stalled"]["message"] == "spec.training.batchSize: too big"


@pytest.mark.parametrize(("phase", "reason", "before", "event"), [
    (Phase.RUNNING, "Training", Phase.PENDING, "Started"),
    (Phase.RUNNING, "Finishing", Phase.RUNNING, "Finishing"),  # not "Started" again: the trainer finished
    (Phase.RUNNING, "Finishing", Phase.PENDING, "Finishing"),
    (Phase.PENDING, "Unschedulable", Phase.PENDING, "Unschedulable"),
    (Phase.SUCCEEDED, "Succeeded", Phase.RUNNING, "Succeeded"),
    (Phase.FAILED, "OutOfMemory", Phase.RUNNING, "Failed"),
    (Phase.QUEUED, "Inadmissible", Phase.PENDING, "Queued"),
    (Phase.QUEUED, "Waiting", Phase.QUEUED, "Waiting"),
])
def test_an_event_says_what_happened(phase: Phase, reason: str, before: Phase, event: str) -> None:
    from kubetune.plan import event_reason

    assert event_reason(phase, reason, before) == event


def test_the_phases_are_listed_once() -> None:
    from kubetune import api, crd

    schema = crd.status_schema()["properties"]["phase"]
    assert schema["enum"] == [p.value for p in Phase] == list(api.FineTuneJobStatus.model_fields["phase"]
                                                             .annotation.__args__[0])  # type: ignore[union-attr]
    assert api.TERMINAL | api.RECONCILING | {Phase.SUSPENDED} == set(Phase)
