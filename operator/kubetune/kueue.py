"""Kueue: how a queued training Job's Workload is read and paused. Pure functions, no API calls.

A Job labelled kueue.x-k8s.io/queue-name belongs to Kueue's admission: Kueue alone flips its
`spec.suspend` (un-suspends it when admitted, suspends it when evicted). The operator therefore
never patches such a Job's suspend; FineTuneJob `spec.suspend` acts on the Job's Workload instead,
through `spec.active`, which is Kueue's supported way to pause a workload (false evicts it and
keeps it out of admission; true puts it back in its queue).
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"  # names a WorkloadPriorityClass
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue labels the Workload of a Job with the Job's UID
# On a Workload the operator deactivated for FineTuneJob spec.suspend: only those are re-activated
# on resume, so a Workload that Kueue itself deactivated (e.g. re-queued too often) stays as it is.
DEACTIVATED_ANNOTATION = "kubetune.io/deactivated-for-suspend"
WAITING = "WaitingForAdmission"
PREEMPTED = "Preempted"  # Kueue's Evicted reason when it made room for a higher-priority Workload
REQUEUED = "Requeued"  # preempted, its pods gone: back in the queue (Kueue's condition Requeued)


def queued(job: Json) -> bool:
    """The Job is Kueue's to admit (it carries a queue name)."""
    return QUEUE_LABEL in ((job.get("metadata") or {}).get("labels") or {})


def active(workload: Json) -> bool:
    return (workload.get("spec") or {}).get("active") is not False


def active_patch(workload: Json, *, suspend: bool) -> Json | None:
    """The merge patch that makes the Workload follow FineTuneJob spec.suspend, or None."""
    annotations = (workload.get("metadata") or {}).get("annotations") or {}
    if suspend and active(workload):
        return {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: "true"}}, "spec": {"active": False}}
    if not suspend and not active(workload) and DEACTIVATED_ANNOTATION in annotations:
        return {"metadata": {"annotations": {DEACTIVATED_ANNOTATION: None}}, "spec": {"active": True}}
    return None


def merged(workload: Json, patch: Json) -> Json:
    """The Workload as it is after `patch` (for the rest of this reconcile pass)."""
    meta = dict(workload.get("metadata") or {})
    annotations = {**(meta.get("annotations") or {}), **patch["metadata"]["annotations"]}
    meta["annotations"] = {k: v for k, v in annotations.items() if v is not None}
    return {**workload, "metadata": meta, "spec": {**(workload.get("spec") or {}), **patch["spec"]}}


def _conditions(workload: Json) -> dict[str, Json]:
    return {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}


def preemption(workload: Json | None) -> str | None:
    """Kueue's message when it evicted the Workload for a higher-priority one (condition Evicted,
    reason Preempted), until it admits the Workload again (which resets Evicted); else None."""
    evicted = _conditions(workload or {}).get("Evicted") or {}
    if evicted.get("status") == "True" and evicted.get("reason") == PREEMPTED:
        return str(evicted.get("message") or "evicted for a higher-priority workload")
    return None


def admission(workload: Json | None) -> tuple[str, str]:
    """(reason, message) of a queued job that is not running, in Kueue's own words (its Workload's
    conditions): why it has no quota yet, why it was evicted, or that it was deactivated.

    A Workload preempted by Kueue keeps its quota until its Job's pods are gone: meanwhile the
    reason is Preempted (the trainer checkpoints on SIGTERM); then Requeued, waiting in its queue."""
    if workload is None:
        return WAITING, "waiting for Kueue to admit the job (Kueue has not made its Workload yet)"
    conditions = _conditions(workload)
    quota = conditions.get("QuotaReserved") or {}
    admitted = conditions.get("Admitted") or {}
    evicted = conditions.get("Evicted") or {}
    if not active(workload):
        why = evicted.get("message") if evicted.get("status") == "True" else None
        return "Deactivated", f"Kueue: {why or 'the Workload is deactivated (spec.active: false)'}"
    preempted = preemption(workload)
    if preempted and quota.get("status") == "True":
        return PREEMPTED, f"preempted by Kueue: {preempted}"
    if preempted:
        waiting = f": {quota['message']}" if quota.get("message") and quota["message"] != preempted else ""
        return REQUEUED, f"preempted by Kueue, waiting to be admitted again{waiting}"
    if admitted.get("status") == "True":
        return WAITING, "admitted by Kueue; the Job starts"
    if quota.get("status") == "True":
        why = admitted.get("message") or "waiting for the ClusterQueue's admission checks"
        return WAITING, f"waiting for Kueue to admit the job: {why}"
    if quota.get("message"):
        reason = "Inadmissible" if quota.get("reason") == "Inadmissible" else WAITING
        return reason, f"waiting for Kueue to admit the job: {quota['message']}"
    return WAITING, "waiting for Kueue to admit the job"
