"""kubetune.kueue: a queued Job's status in Kueue's words, and spec.suspend through Workload.spec.active."""

from __future__ import annotations

from typing import Any

from kubetune import kueue, status

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
