"""kubetune.kueue: a queued Job's status in Kueue's words, and spec.suspend through Workload.spec.active."""

from __future__ import annotations

from typing import Any

from kubetune import kueue, status
from kubetune.api import Phase

NO_QUOTA = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
            "flavor gpu, 1 more needed")


def workload(*conditions: tuple[str, str, str, str], active: bool | None = None,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {} if active is None else {"active": active}
    return {"metadata": {"name": "job-x-trainer-1a2b3", "annotations": annotations or {}}, "spec": spec,
            "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                      for t, s, r, m in conditions]}}


def test_no_quota_shows_kueues_own_message() -> None:
    reason, message = kueue.admission(workload(("QuotaReserved", "False", "Pending", NO_QUOTA)))
    assert reason == "WaitingForAdmission" and NO_QUOTA in message


def test_a_missing_local_queue_is_inadmissible() -> None:
    text = "LocalQueue team-a doesn't exist"
    assert kueue.admission(workload(("QuotaReserved", "False", "Inadmissible", text))) == (
        "Inadmissible", f"waiting for Kueue to admit the job: {text}")


def test_a_deactivated_workload_says_so_with_kueues_eviction_message() -> None:
    reason, message = kueue.admission(workload(("Evicted", "True", "Deactivated", "The workload is deactivated"),
                                               active=False))
    assert reason == "Deactivated" and "The workload is deactivated" in message


def test_before_the_workload_exists_the_job_waits_for_admission() -> None:
    assert kueue.admission(None)[0] == "WaitingForAdmission"


def test_suspend_deactivates_and_marks_the_workload() -> None:
    patch = kueue.active_patch(workload(), suspend=True)
    assert patch == {"metadata": {"annotations": {kueue.DEACTIVATED_ANNOTATION: "true"}}, "spec": {"active": False}}
    after = kueue.merged(workload(), patch)
    assert not kueue.active(after) and kueue.active_patch(after, suspend=True) is None


def test_resume_reactivates_only_what_suspend_deactivated() -> None:
    ours = workload(active=False, annotations={kueue.DEACTIVATED_ANNOTATION: "true"})
    patch = kueue.active_patch(ours, suspend=False)
    assert patch is not None and patch["spec"] == {"active": True}
    after = kueue.merged(ours, patch)
    assert kueue.active(after) and kueue.DEACTIVATED_ANNOTATION not in after["metadata"]["annotations"]
    # Deactivated by Kueue itself (e.g. re-queued too often): not the operator's to undo.
    assert kueue.active_patch(workload(active=False), suspend=False) is None


def test_a_queued_suspended_job_is_queued_with_kueues_reason() -> None:
    job = {"metadata": {"labels": {kueue.QUEUE_LABEL: "team-a"}}, "spec": {"suspend": True}, "status": {}}
    admission = kueue.admission(workload(("QuotaReserved", "False", "Pending", NO_QUOTA)))
    observed = status.observe(job, [], suspend=False, queued=kueue.queued(job), admission=admission)
    assert (observed.phase, observed.reason) == ("Queued", "WaitingForAdmission") and NO_QUOTA in observed.message
    assert status.observe(job, [], suspend=True, queued=True, admission=admission).phase == "Suspended"


PREEMPTED_BY = ("Preempted to accommodate a workload (UID: 1a2b, JobUID: 3c4d) due to prioritization in the "
                "ClusterQueue")
TERMINATED = {"exitCode": 143, "message": '{"exitCode": 143, "step": 20, "error": "stopped by SIGTERM"}'}


def preempted_job_and_pod(terminated: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Job Kueue suspended (its pod stopping, or stopped), as the operator sees it."""
    job = {"metadata": {"labels": {kueue.QUEUE_LABEL: "team-a"}}, "spec": {"suspend": True},
           "status": {"active": 0 if terminated else 1}}
    state = {"terminated": terminated} if terminated else {"running": {}}
    pod = {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"phase": "Failed" if terminated else "Running",
                      "containerStatuses": [{"name": "trainer", "state": state}]}}
    return job, [pod]


def test_a_preempted_workload_that_still_holds_its_quota_is_preempted() -> None:
    reason, message = kueue.admission(workload(("QuotaReserved", "True", "QuotaReserved", "Quota reserved"),
                                               ("Evicted", "True", "Preempted", PREEMPTED_BY),
                                               ("Preempted", "True", "InClusterQueue", PREEMPTED_BY)))
    assert (reason, message) == ("Preempted", f"preempted by Kueue: {PREEMPTED_BY}")


def test_a_preempted_workload_back_in_its_queue_is_waiting() -> None:
    reason, message = kueue.admission(workload(("QuotaReserved", "False", "Pending", NO_QUOTA),
                                               ("Evicted", "True", "Preempted", PREEMPTED_BY),
                                               ("Requeued", "True", "Preempted", PREEMPTED_BY)))
    assert reason == "Requeued"
    assert message == f"preempted by Kueue, waiting to be admitted again: {NO_QUOTA}"


def test_readmission_ends_the_preemption() -> None:
    again = workload(("QuotaReserved", "True", "QuotaReserved", "Quota reserved"),
                     ("Evicted", "False", "QuotaReserved", f"Previously: {PREEMPTED_BY}"))
    assert kueue.preemption(again) is None


def test_other_evictions_are_not_preemption() -> None:
    assert kueue.preemption(workload(("Evicted", "True", "PodsReadyTimeout", "timed out"))) is None


def test_a_preempted_job_is_preempted_not_failed_and_names_its_checkpoint() -> None:
    admission = ("Preempted", f"preempted by Kueue: {PREEMPTED_BY}")
    job, pods = preempted_job_and_pod()
    observed = status.observe(job, pods, suspend=False, queued=True, admission=admission)
    assert (observed.phase, observed.reason) == ("Preempted", "Preempted")
    assert "the trainer writes a checkpoint" in observed.message
    # The trainer exited 143 after checkpointing: the message says from which step it resumes.
    job, pods = preempted_job_and_pod(TERMINATED)
    observed = status.observe(job, pods, suspend=False, queued=True, admission=admission)
    assert observed.phase == "Preempted"
    assert observed.message.endswith("it resumes from the checkpoint of step 20 when Kueue admits it again")


def test_a_requeued_job_is_queued_and_names_its_checkpoint_while_its_pod_shows_it() -> None:
    admission = ("Requeued", "preempted by Kueue, waiting to be admitted again")
    job, pods = preempted_job_and_pod(TERMINATED)
    observed = status.observe(job, pods, suspend=False, queued=True, admission=admission)
    assert (observed.phase, observed.reason) == ("Queued", "Requeued")
    assert observed.message.endswith("it resumes from the checkpoint of step 20 when Kueue admits it again")
    assert status.observe(job, [], suspend=False, queued=True, admission=admission).message == admission[1]


def test_preempted_is_in_progress_not_stalled() -> None:
    conds = {c["type"]: c["status"] for c in status.conditions(Phase.PREEMPTED, "Preempted", "m", 1, [], "now")}
    assert conds == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}
