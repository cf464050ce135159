"""plan.plan: what one reconcile pass does, decided from what it observed, with no API and no clock.

Each test builds a World (the FineTuneJob, its Job, the facts read), plans, and checks the
actions, the facts asked for, and when the job is looked at again."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetune import plan, render
from kubetune.api import FineTuneJobStatus
from kubetune.plan import (
    Create,
    DeleteChildren,
    Fact,
    MissingClaims,
    NamespaceOf,
    Need,
    Plan,
    PodRefusal,
    PodsOf,
    PostEvent,
    PresetNamed,
    SetJobSuspend,
    WorkloadOf,
    World,
    WriteStatus,
)
from kubetune.settings import Settings
from kubetune.status import as_patch

Json = dict[str, Any]
UID = "11111111-2222-3333-4444-555555555555"
NOW = "2026-01-01T00:10:00Z"
SETTINGS = Settings(report_url="http://operator:8080")
NAMESPACE: Json = {"metadata": {"name": "ns", "labels": {}}}


def finetunejob(status: Json | None = None, **spec: Any) -> Json:
    return {"metadata": {"name": "job", "namespace": "ns", "uid": UID, "generation": 1},
            "spec": {"model": {"source": "s3://m/tiny/"}, "dataset": {"train": "s3://d/train.jsonl"},
                     "training": {"maxSteps": 10}, "output": {"location": "s3://runs/"},
                     "resources": {"gpus": 0}, **spec},
            "status": status or {}}


def the_job(ftj: Json, **status: Any) -> Json:
    """The training Job as the API server shows it once created from `ftj`."""
    config_map = render.render_config_map(ftj, spec_of(ftj), SETTINGS)
    job = render.render_job(ftj, spec_of(ftj), SETTINGS, config_map, {})
    job["metadata"]["uid"] = "job-uid"
    job["status"] = status
    return job


def spec_of(ftj: Json) -> Any:
    from kubetune.api import FineTuneJobSpec

    return FineTuneJobSpec.model_validate(ftj["spec"])


def pod(phase: str, **status: Any) -> Json:
    return {"metadata": {"name": "job-trainer-abc", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase, **status}}


def run(ftj: Json, job: Json | None = None, **answers: Any) -> tuple[Plan, list[Fact]]:
    """Plan as the reconciler does: answer each fact the plan needs (from `answers`, by fact class
    name), and record which facts it asked for."""
    facts: dict[Fact, Any] = {}
    asked: list[Fact] = []
    while True:
        try:
            return plan.plan(World(ftj, job, NOW, SETTINGS, facts)), asked
        except Need as need:
            asked.append(need.fact)
            name = type(need.fact).__name__
            defaults: Json = {"NamespaceOf": NAMESPACE, "PodsOf": [], "PodRefusal": None, "MissingClaims": []}
            facts[need.fact] = answers[name] if name in answers else defaults[name]


def settle(ftj: Json, planned: Plan) -> Json:
    """The FineTuneJob after the plan's status writes."""
    out = copy.deepcopy(ftj)
    for action in planned.actions:
        if isinstance(action, WriteStatus):
            out["status"] = {**out["status"], **as_patch(action.status)}
    return out


def kinds(planned: Plan) -> list[str]:
    return [type(a).__name__ for a in planned.actions]


def events(planned: Plan) -> list[tuple[str, str]]:
    return [(a.type, a.reason) for a in planned.actions if isinstance(a, PostEvent)]


def test_a_new_job_creates_its_children_the_job_last_and_shows_the_job_it_made() -> None:
    planned, asked = run(finetunejob())
    assert asked == [NamespaceOf("ns")], "a job with no preset, PVC or GPU estimate needs one read"
    assert kinds(planned) == ["Create", "WriteStatus", "PostEvent"]
    create = planned.actions[0]
    assert isinstance(create, Create)
    assert [o["kind"] for o in create.objects] == ["Secret", "ConfigMap", "NetworkPolicy", "Job"]
    written = planned.actions[1]
    assert isinstance(written, WriteStatus)
    assert (written.status.phase, written.status.reason) == ("Pending", "Starting")
    assert planned.actions[2] == PostEvent("Normal", "Created", "created Job job-trainer: waiting for the training pod")
    assert planned.retry is None


def test_a_queued_job_is_created_suspended_and_shown_waiting_for_kueue() -> None:
    planned, _ = run(finetunejob(scheduling={"queueName": "team"}))
    written = next(a for a in planned.actions if isinstance(a, WriteStatus))
    assert (written.status.phase, written.status.reason) == ("Queued", "WaitingForAdmission")
    create = planned.actions[0]
    assert isinstance(create, Create) and create.announce, "Created, then Queued: two Events"
    assert events(planned) == [("Normal", "Queued")]


def test_a_pass_that_changes_nothing_is_an_empty_plan() -> None:
    ftj = finetunejob()
    job = the_job(ftj, active=1, startTime="2026-01-01T00:00:00Z")
    first, _ = run(ftj, job, PodsOf=[pod("Running")])
    assert events(first) == [("Normal", "Started")]
    again, asked = run(settle(ftj, first), job, PodsOf=[pod("Running")])
    assert again.actions == () and again.retry is None and again.phase == "Running"
    assert all(isinstance(fact, PodsOf) for fact in asked), "a running job is followed from the watch caches alone"


def test_a_job_without_pods_asks_whether_the_job_controller_was_refused() -> None:
    ftj = finetunejob()
    job = the_job(ftj)
    planned, asked = run(ftj, job, PodRefusal='pods "x" is forbidden: exceeded quota')
    assert PodRefusal("ns", "job-uid") in asked
    written = next(a for a in planned.actions if isinstance(a, WriteStatus))
    assert written.status.reason == "PodRejected"
    assert events(planned) == [("Warning", "PodRejected")]


def test_a_missing_pvc_is_waited_for_and_nothing_is_created() -> None:
    ftj = finetunejob(model={"source": "pvc://models/tiny"})
    planned, asked = run(ftj, MissingClaims=["PersistentVolumeClaim models"])
    assert MissingClaims("ns", ("models",)) in asked
    assert "Create" not in kinds(planned)
    assert planned.retry is not None and planned.retry[1] == plan.WAIT_SECONDS
    assert events(planned) == [("Warning", "MissingDependency")]


def test_a_missing_preset_is_waited_for() -> None:
    planned, asked = run(finetunejob(preset={"kind": "FineTunePreset", "name": "small"}), PresetNamed=None)
    assert PresetNamed("FineTunePreset", "ns", "small") in asked
    assert planned.retry is not None and "waiting for FineTunePreset small" in planned.retry[0]
    assert "Create" not in kinds(planned)


def test_an_invalid_spec_fails_before_any_job() -> None:
    planned, _ = run(finetunejob(training={"maxSteps": 10, "epochs": 1}))
    written = next(a for a in planned.actions if isinstance(a, WriteStatus))
    assert (written.status.phase, written.status.reason) == ("Failed", "InvalidSpec")
    assert events(planned) == [("Warning", "Failed")]
    assert "Create" not in kinds(planned)


def test_a_job_of_its_name_owned_by_another_is_never_adopted() -> None:
    ftj = finetunejob()
    stranger = the_job(ftj)
    stranger["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    planned, asked = run(ftj, stranger)
    assert kinds(planned) == ["WriteStatus", "PostEvent"]
    assert planned.retry is not None and planned.retry[1] == plan.NAME_CONFLICT_SECONDS
    assert not any(isinstance(f, PodsOf) for f in asked), "its pods are never looked at"


def test_spec_suspend_suspends_the_job_and_resume_says_resumed() -> None:
    ftj = finetunejob(suspend=True)
    job = the_job(finetunejob(), active=1, startTime="2026-01-01T00:00:00Z")
    planned, _ = run(ftj, job, PodsOf=[])
    assert planned.actions[0] == SetJobSuspend("ns", "job-trainer", True)
    assert ("Normal", "Suspended") in events(planned)
    suspended = settle(ftj, planned)
    resumed, _ = run({**suspended, "spec": finetunejob(suspend=False)["spec"]},
                     {**job, "spec": {**job["spec"], "suspend": True}})
    assert resumed.actions[0] == SetJobSuspend("ns", "job-trainer", False)
    assert ("Normal", "Resumed") in events(resumed)


def test_a_queued_job_suspended_before_its_workload_exists_is_looked_at_again_soon() -> None:
    ftj = finetunejob(suspend=True, scheduling={"queueName": "team"})
    job = the_job(ftj)
    planned, asked = run(ftj, job, WorkloadOf=None)
    assert WorkloadOf("ns", "job-uid") in asked
    assert not any(isinstance(a, SetJobSuspend) for a in planned.actions), "Kueue alone flips its suspend"
    assert planned.retry is not None and planned.retry[1] == plan.WORKLOAD_SECONDS


def test_a_queued_job_suspended_deactivates_its_workload() -> None:
    ftj = finetunejob(suspend=True, scheduling={"queueName": "team"})
    workload = {"metadata": {"name": "wl", "annotations": {}}, "spec": {"active": True}, "status": {}}
    planned, _ = run(ftj, the_job(ftj), WorkloadOf=workload)
    patch = next(a for a in planned.actions if isinstance(a, plan.PatchWorkload))
    assert (patch.name, patch.patch["spec"]) == ("wl", {"active": False})


DONE = {"phase": "Succeeded", "reason": "Succeeded", "completionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 1}


@pytest.mark.parametrize(("ttl", "expected"), [(60, "removed"), (3600, "later"), (None, "kept")])
def test_ttl_after_finished_removes_the_children_at_its_time(ttl: int | None, expected: str) -> None:
    ftj = finetunejob(DONE, **({"ttlSecondsAfterFinished": ttl} if ttl is not None else {}))
    job = the_job(ftj, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    planned, _ = run(ftj, job)
    if expected == "removed":
        assert planned.actions == (DeleteChildren("ns", "job", UID), WriteStatus(FineTuneJobStatus(cleanup_time=NOW)),
                                   PostEvent("Normal", "Cleaned", "removed the Job and its pods 60s after the end"))
    elif expected == "later":
        assert planned.retry is not None and planned.retry[1] == 3600 - 600
        assert planned.actions == ()
    else:
        assert not any(isinstance(a, DeleteChildren) for a in planned.actions)


def test_a_finished_job_whose_children_are_gone_creates_nothing_again() -> None:
    planned, asked = run(finetunejob(DONE))
    assert planned.actions == () and asked == []
    cleaned, _ = run(finetunejob(DONE, ttlSecondsAfterFinished=60))
    assert cleaned.actions == (WriteStatus(FineTuneJobStatus(cleanup_time=NOW)),)


def test_the_estimate_pending_is_waited_for_and_wontfit_fails_without_a_job() -> None:
    from kubetune import preflight

    ftj = finetunejob(resources={"gpus": 1, "gpuMemory": "16Gi"})
    pending, asked = run(ftj, EstimateOf=preflight.PENDING)
    assert any(isinstance(f, plan.EstimateOf) for f in asked)
    assert pending.retry is not None and "Create" not in kinds(pending)
    refused, _ = run(ftj, EstimateOf=preflight.Verdict("wontfit", "needs 40 GiB"))
    assert ("Warning", "Failed") in events(refused) and "Create" not in kinds(refused)
    fits, _ = run(ftj, EstimateOf=preflight.Verdict("fits", "needs 4 GiB of 16 GiB"))
    assert kinds(fits)[:2] == ["PostEvent", "Create"] and events(fits)[0] == ("Normal", "Estimated")


def test_a_running_job_whose_spec_stops_validating_is_followed_not_failed() -> None:
    # What an upgrade that tightens validation leaves behind: a Job made when the spec was valid.
    ftj = finetunejob({"phase": "Running", "reason": "Training", "observedGeneration": 1},
                      env=[{"name": "KUBETUNE_X", "value": "1"}])
    job = the_job(finetunejob(), active=1)
    planned, _ = run(ftj, job, PodsOf=[pod("Running")])
    assert planned.phase == "Running" and not any(a.status.phase == "Failed" for a in planned.actions
                                                  if isinstance(a, WriteStatus))
    assert planned.warning is not None and "no longer validates" in planned.warning


def test_a_job_that_pushed_its_artifact_says_where_in_an_event() -> None:
    reference = "registry.example/team/a@sha256:" + "e" * 64
    summary = {"step": 10, "totalSteps": 10, "artifacts": {
        "location": "s3://runs/ns/job/11111111", "ociDigest": "sha256:" + "e" * 64, "ociReference": reference}}
    ftj = finetunejob({"phase": "Running", "reason": "Training", "observedGeneration": 1})
    job = the_job(ftj, succeeded=1, conditions=[{"type": "Complete", "status": "True",
                                                 "lastTransitionTime": "2026-01-01T00:05:00Z"}])
    done = pod("Succeeded")
    done["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
        "exitCode": 0, "message": json.dumps(summary)}}}]
    planned, _ = run(ftj, job, PodsOf=[done])
    written = next(a for a in planned.actions if isinstance(a, WriteStatus))
    assert written.status.artifacts is not None and written.status.artifacts.oci_reference == reference
    assert PostEvent("Normal", "Pushed", f"pushed the adapter to {reference}") in planned.actions


# --- stalls: a Running job whose training steps stopped (training.stallTimeoutSeconds, default 1200) ---

def running(updated_at: str, activity: str = "training", **spec: Any) -> Json:
    return finetunejob({"phase": "Running", "reason": "Training", "observedGeneration": 1, "startTime": NOW,
                        "progress": {"step": 40, "totalSteps": 100, "updatedAt": updated_at, "activity": activity}},
                       **spec)


def started(at: str, deleting: bool = False) -> Json:
    found = pod("Running", startTime=at)
    if deleting:
        found["metadata"]["deletionTimestamp"] = NOW
    return found


LONG_AGO = "2025-12-31T23:49:00Z"  # 21 minutes before NOW


def stall_pass(ftj: Json, *pods: Json) -> tuple[Plan, FineTuneJobStatus | None]:
    planned, _ = run(ftj, the_job(ftj, active=1), PodsOf=list(pods))
    written = next((a.status for a in planned.actions if isinstance(a, WriteStatus)), None)
    return planned, written


def test_a_run_silent_while_training_past_the_timeout_is_stalled_and_its_pods_restarted() -> None:
    planned, written = stall_pass(running(LONG_AGO), started(LONG_AGO))
    assert written is not None and (written.phase, written.reason) == ("Running", "NoProgress")
    assert "no training step for 1260s (training.stallTimeoutSeconds 1200)" in (written.message or "")
    assert "step 40" in (written.message or "") and "restarted" in (written.message or "")
    stalled = next(c for c in written.conditions or [] if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "NoProgress")
    assert plan.DeletePods("ns", "job-uid") in planned.actions
    assert ("Warning", "NoProgress") in events(planned)


def test_stall_action_none_only_reports() -> None:
    planned, written = stall_pass(running(LONG_AGO, training={"maxSteps": 10, "stallAction": "none"}),
                                  started(LONG_AGO))
    assert written is not None and written.reason == "NoProgress" and "left running" in (written.message or "")
    assert not any(isinstance(a, plan.DeletePods) for a in planned.actions)


@pytest.mark.parametrize(("ftj", "pods", "why"), [
    (running("2026-01-01T00:05:00Z"), [started(LONG_AGO)], "heard from 5 minutes ago"),
    (running(LONG_AGO, activity="evaluating"), [started(LONG_AGO)], "evaluating is not a stall"),
    (running(LONG_AGO, activity="checkpointing"), [started(LONG_AGO)], "checkpointing is not a stall"),
    (running(LONG_AGO, activity="preparing"), [started(LONG_AGO)], "a download is not a stall"),
    (running(LONG_AGO), [started(LONG_AGO, deleting=True), started("2026-01-01T00:09:00Z")],
     "a replacement pod started a minute ago"),
    (running(LONG_AGO, training={"maxSteps": 10, "stallTimeoutSeconds": None}), [started(LONG_AGO)],
     "stallTimeoutSeconds null: never checked"),
])
def test_what_is_not_a_stall(ftj: Json, pods: list[Json], why: str) -> None:
    planned, written = stall_pass(ftj, *pods)
    assert written is None or written.reason != "NoProgress", why
    assert not any(isinstance(a, plan.DeletePods) for a in planned.actions), why


def test_a_training_run_is_looked_at_again_when_it_would_stall() -> None:
    planned, _ = stall_pass(running("2026-01-01T00:05:00Z"), started(LONG_AGO))
    assert planned.retry is not None and planned.retry[1] == 1200 - 300 + 1


# --- showback: each attempt counted once when it ends (plan.Account → metrics.account) ---

def ran(start: str, end: str | None = None, phase: str = "Running") -> Json:
    found = pod(phase, startTime=start)
    if end:
        found["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": 0 if phase == "Succeeded" else 1, "finishedAt": end}}}]
    return found


def accounted(planned: Plan) -> list[plan.Account]:
    return [a for a in planned.actions if isinstance(a, plan.Account)]


def test_an_attempt_is_counted_once_when_it_ends_with_its_gpu_seconds() -> None:
    ftj = finetunejob({"phase": "Running", "reason": "Training", "observedGeneration": 1},
                      resources={"gpus": 2}, scheduling={"queueName": "team-a"})
    done = the_job(ftj, succeeded=1, conditions=[{"type": "Complete", "status": "True",
                                                  "lastTransitionTime": "2026-01-01T00:05:00Z"}])
    attempt = ran("2026-01-01T00:00:00Z", "2026-01-01T00:04:00Z", "Succeeded")
    planned, _ = run(ftj, done, PodsOf=[attempt])
    assert accounted(planned) == [plan.Account("ns", "", "team-a", "succeeded", 240.0, 2)]
    # The next pass sees the job Succeeded already: nothing more is counted.
    again, _ = run(settle(ftj, planned), done, PodsOf=[attempt])
    assert accounted(again) == []


def test_an_attempt_that_failed_and_will_be_retried_is_lost_work() -> None:
    ftj = finetunejob({"phase": "Running", "reason": "Training", "observedGeneration": 1}, resources={"gpus": 1})
    job = the_job(ftj, failed=1, active=0)
    planned, _ = run(ftj, job, PodsOf=[ran("2026-01-01T00:00:00Z", "2026-01-01T00:01:40Z", "Failed")])
    assert [(a.outcome, a.seconds, a.gpus) for a in accounted(planned)] == [("failed", 100.0, 1)]


def test_a_job_never_seen_running_is_still_counted_when_it_finishes() -> None:
    ftj = finetunejob({"phase": "Pending", "reason": "Starting", "observedGeneration": 1}, resources={"gpus": 1})
    done = the_job(ftj, succeeded=1, conditions=[{"type": "Complete", "status": "True",
                                                  "lastTransitionTime": "2026-01-01T00:05:00Z"}])
    planned, _ = run(ftj, done, PodsOf=[ran("2026-01-01T00:00:00Z", "2026-01-01T00:02:00Z", "Succeeded")])
    assert [(a.outcome, a.seconds) for a in accounted(planned)] == [("succeeded", 120.0)]


def test_a_thousand_finished_jobs_leave_bounded_series() -> None:
    """Showback labels are namespace, preset, queue and outcome; per-job series exist only while a job
    runs. A thousand jobs that ran and finished leave the same series as one."""
    from prometheus_client import REGISTRY, generate_latest

    from kubetune import metrics

    def series() -> int:
        return sum(1 for line in generate_latest(REGISTRY).decode().splitlines()
                   if line.startswith(("kubetune_gpu_seconds_total", "kubetune_finetunejob_progress_ratio",
                                       "kubetune_attempts_total{")) and 'namespace="bulk"' in line)

    before = REGISTRY.get_sample_value("kubetune_gpu_seconds_total",
                                       {"namespace": "bulk", "preset": "", "queue": "", "outcome": "succeeded"}) or 0
    for i in range(1000):
        metrics.running("bulk", f"job-{i}", 0.5)
        metrics.observe_phase("bulk", f"job-{i}", "Running")
    assert series() == 1000, "one progress series per running job"
    for i in range(1000):
        ftj = finetunejob({"phase": "Running", "reason": "Training", "observedGeneration": 1}, resources={"gpus": 1})
        ftj["metadata"].update(name=f"job-{i}", namespace="bulk")
        done = the_job(ftj, succeeded=1, conditions=[{"type": "Complete", "status": "True",
                                                      "lastTransitionTime": "2026-01-01T00:05:00Z"}])
        planned, _ = run(ftj, done, PodsOf=[ran("2026-01-01T00:00:00Z", "2026-01-01T00:00:10Z", "Succeeded")])
        for a in accounted(planned):
            metrics.account(a.namespace, a.preset, a.queue, a.outcome, a.seconds, a.gpus)
        metrics.running("bulk", f"job-{i}", None)
        metrics.forget("bulk", f"job-{i}")
    assert series() == 2, "one GPU-seconds and one attempts series for the namespace, no per-job series left"
    after = REGISTRY.get_sample_value("kubetune_gpu_seconds_total",
                                      {"namespace": "bulk", "preset": "", "queue": "", "outcome": "succeeded"})
    assert after == before + 10_000


def test_an_operator_that_just_started_does_not_blame_runs_it_could_not_hear() -> None:
    ftj = running(LONG_AGO)
    job = the_job(ftj, active=1)
    facts = {NamespaceOf("ns"): NAMESPACE, PodsOf("job-uid", job): [started(LONG_AGO)]}
    world = World(ftj, job, NOW, SETTINGS, facts, operator_since="2026-01-01T00:08:00Z")
    planned = plan.plan(world)
    assert not any(isinstance(a, plan.DeletePods) for a in planned.actions)
    assert planned.retry is not None and planned.retry[1] == 1200 - 120 + 1


def test_a_stalled_job_stays_stalled_while_its_pods_are_replaced_with_one_event() -> None:
    ftj = running(LONG_AGO)
    ftj["status"].update(reason="NoProgress", message="no training step for 1260s …")
    planned, written = stall_pass(ftj, started(LONG_AGO, deleting=True))
    assert written is not None and (written.phase, written.reason) == ("Pending", "NoProgress")
    assert written.message == "no training step for 1260s …"
    assert next(c for c in written.conditions or [] if c.type == "Stalled").status == "True"
    assert events(planned) == [], "the stall was told once"


def test_stall_restarts_are_counted_and_bounded_by_the_backoff_limit() -> None:
    planned, written = stall_pass(running(LONG_AGO, backoffLimit=1), started(LONG_AGO))
    assert written is not None and written.stall_restarts == 1
    assert any(isinstance(a, plan.DeletePods) for a in planned.actions)
    # Seen again while its pods are still stopping: the same restart, not another.
    again = running(LONG_AGO, backoffLimit=1)
    again["status"].update(reason="NoProgress", stallRestarts=1)
    planned, written = stall_pass(again, started(LONG_AGO))
    assert written is None or written.stall_restarts == 1
    # A new stall after backoffLimit restarts: reported, the pods left alone.
    later = running(LONG_AGO, backoffLimit=1)
    later["status"].update(stallRestarts=1)
    planned, written = stall_pass(later, started(LONG_AGO))
    assert written is not None and written.reason == "NoProgress" and written.stall_restarts == 1
    assert "not restarted again: 1 stall restarts already (backoffLimit)" in (written.message or "")
    assert not any(isinstance(a, plan.DeletePods) for a in planned.actions)


def test_a_stall_restart_counts_the_stalled_attempt_once() -> None:
    planned, _ = stall_pass(running(LONG_AGO), started(LONG_AGO))
    assert [(a.outcome, a.seconds) for a in accounted(planned)] == [("failed", 1260.0)]
    replacing = running(LONG_AGO)
    replacing["status"].update(reason="NoProgress", stallRestarts=1)
    planned, _ = stall_pass(replacing, started(LONG_AGO, deleting=True))
    assert accounted(planned) == [], "leaving Running while its pods are replaced is the same attempt"
