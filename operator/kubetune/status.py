"""Pure functions: (Job, Pods, previous status) → FineTuneJob status with conditions.

`observe` says what the Job and its pods show (`Observed`); `build_status`, `waiting_status` and
`refused_status` make the `api.FineTuneJobStatus` to write, the one shape of a status; `as_patch`
is what goes to the API server.

Level-based: the status is recomputed from what the cluster shows, so an operator that restarts
(or missed events) writes the same status. Conditions follow the Kubernetes API conventions with
Ready / Reconciling / Stalled, which kstatus (Flux, Argo CD, kubectl wait) understands.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune.api import RECONCILING, TERMINAL, FineTuneJobStatus, Phase
from kubetune.kueue import PREEMPTED, REQUEUED
from kubetune.render import CONTAINER
from kubetune_contract.config import (
    EXIT_INVALID_INPUT,
    EXIT_OUT_OF_MEMORY,
    EXIT_REGISTRY_UNAVAILABLE,
    EXIT_SOURCE_UNAVAILABLE,
    EXIT_STORE_UNAVAILABLE,
    EXIT_TERMINATED,
    GateSpec,
)
from kubetune_contract.events import Evaluation, GateResult, Summary, check_gate

Json = dict[str, Any]

IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
# The kubelet cannot start the container (a Secret without the key the job names, a bad mount...):
# shown with the kubelet's own reason and message, not as "starting".
CONTAINER_START_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                           "CrashLoopBackOff")
# The kubelet's message when a Secret the pod references does not exist (yet).
MISSING_SECRET = re.compile(r"""secret ["']([^"']+)["'] not found""")
GATE_FAILED = "EvaluationGateFailed"
NO_PROGRESS = "NoProgress"
"""A Running job whose training steps stopped advancing (plan.stall_check)."""
EXIT_REASONS = {EXIT_INVALID_INPUT: "InvalidInput", EXIT_SOURCE_UNAVAILABLE: "SourceUnavailable",
                EXIT_STORE_UNAVAILABLE: "StoreUnavailable",
                EXIT_REGISTRY_UNAVAILABLE: "RegistryUnavailable", EXIT_OUT_OF_MEMORY: "OutOfMemory",
                EXIT_TERMINATED: "Interrupted"}


@dataclass(frozen=True)
class Observed:
    """What the operator saw: phase, reason and message, plus facts for the status."""

    phase: Phase
    reason: str
    message: str
    start_time: str | None = None
    completion_time: str | None = None
    attempts: int | None = None
    summary: Json | None = None


def rfc3339(stamp: str | None) -> str | None:
    """A timestamp as Kubernetes writes it (2026-01-01T00:00:00Z), whatever ISO form it came in."""
    if not stamp:
        return None
    parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(dt.UTC)
    return parsed.strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(job: Json | None, kind: str) -> Json | None:
    """The Job condition of this type with status True, if any."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def finished(job: Json) -> bool:
    """The Job is Complete or Failed."""
    return condition(job, "Complete") is not None or condition(job, "Failed") is not None


def trainer_status(pod: Json) -> Json:
    """The trainer container's status in a pod ({} before the kubelet reports it)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return dict(status)
    return {}


def terminated_state(pod: Json) -> Json | None:
    status = trainer_status(pod)
    terminated: Json | None = (status.get("state") or {}).get("terminated") or (
        status.get("lastState") or {}).get("terminated")
    return terminated


def waiting_state(pod: Json) -> Json | None:
    waiting: Json | None = (trainer_status(pod).get("state") or {}).get("waiting")
    return waiting


def parse_summary(message: str | None) -> Json | None:
    """The trainer's final summary (JSON in the termination message), or None if it is not JSON."""
    if not message:
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def describe_failure(pod: Json) -> tuple[str, str] | None:
    """(reason, message) of a pod's failed trainer container, for users."""
    state = terminated_state(pod)
    if not state or state.get("exitCode", 0) == 0:
        return None
    code = state.get("exitCode")
    if state.get("reason") == "OOMKilled":
        return "OOMKilled", (
            "the trainer ran out of memory (OOMKilled): raise resources.memory, or lower "
            "training.batchSize / dataset.maxLength, or use quantization int8/int4"
        )
    text = state.get("message") or ""
    summary = parse_summary(text)
    if summary and summary.get("error"):
        text = str(summary["error"])
    text = text.strip()[-1024:]
    reason = EXIT_REASONS.get(int(code or 1), "TrainerError")
    if code == EXIT_TERMINATED and not text:
        text = "stopped by SIGTERM after checkpointing; a retry continues from that step"
    return reason, f"trainer exited with code {code}: {text}" if text else f"trainer exited with code {code}"


def checkpoint_note(pods: list[Json]) -> str:
    """'; it resumes from the checkpoint of step N' while the pod of a trainer stopped by SIGTERM
    still shows which step it checkpointed (its summary), else ''."""
    for pod in pods:
        state = terminated_state(pod) or {}
        summary = parse_summary(state.get("message")) or {}
        if state.get("exitCode") == EXIT_TERMINATED and isinstance(summary.get("step"), int):
            return f"; it resumes from the checkpoint of step {summary['step']} when Kueue admits it again"
    return ""


def with_image_id(summary: Json, image_id: str | None) -> None:
    """Complete the summary's lineage with the image the node ran, by digest (the pod's imageID):
    the trainer cannot see it, the kubelet reports it."""
    artifacts = summary.get("artifacts")
    lineage = artifacts.get("lineage") if isinstance(artifacts, dict) else None
    if isinstance(lineage, dict) and image_id:
        lineage["imageID"] = image_id


def newest(pods: list[Json]) -> list[Json]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def observe(job: Json | None, pods: list[Json], *, suspend: bool, queued: bool,
            admission: tuple[str, str] | None = None) -> Observed:
    """The phase of a FineTuneJob from its Job and the Job's pods; `admission`: Kueue's (reason,
    message) for a queued Job that is not running (kubetune.kueue.admission)."""
    if job is None:
        return Observed(Phase.PENDING, "Creating", "creating the training Job")
    status = job.get("status") or {}
    counts = sum(int(status.get(k) or 0) for k in ("active", "failed", "succeeded"))
    # One attempt runs one pod per node (an Indexed Job of that many completions).
    group = int((job.get("spec") or {}).get("completions") or 1)
    attempts = -(-max(counts, len(pods)) // group) or None
    start = status.get("startTime")
    pods = newest(pods)

    done = condition(job, "Complete") or condition(job, "SuccessCriteriaMet")
    if done:
        # Over several pods, only the one of rank 0 carries the summary.
        summaries = ((parse_summary((terminated_state(p) or {}).get("message")), p) for p in pods
                     if (terminated_state(p) or {}).get("exitCode") == 0)
        summary, pod = next(((s, p) for s, p in summaries if s), (None, None))
        if summary and pod:
            with_image_id(summary, trainer_status(pod).get("imageID"))
        completion = status.get("completionTime") or done.get("lastTransitionTime")
        return Observed(Phase.SUCCEEDED, "Succeeded", "training finished", start, completion, attempts, summary)

    failed = condition(job, "Failed") or condition(job, "FailureTarget")
    if failed:
        described = next((d for d in (describe_failure(p) for p in pods) if d), None)
        job_reason = failed.get("reason") or "Failed"
        if job_reason == "DeadlineExceeded":
            reason, message = job_reason, "the job ran longer than activeDeadlineSeconds and was stopped"
        elif job_reason == "BackoffLimitExceeded":
            last = f"; last error: {described[1]}" if described else ""
            reason, message = job_reason, f"the trainer failed {attempts or 0} times (backoffLimit reached){last}"
        elif described:
            reason, message = described
        else:
            reason, message = job_reason, failed.get("message") or "the training Job failed"
        return Observed(Phase.FAILED, reason, message, start, failed.get("lastTransitionTime"), attempts)

    if (job.get("spec") or {}).get("suspend"):
        if suspend:
            return Observed(Phase.SUSPENDED, "Suspended", "suspended: set spec.suspend=false to resume",
                            start, None, attempts)
        if queued:
            reason, message = admission or ("WaitingForAdmission", "waiting for Kueue to admit the job")
            if reason == PREEMPTED:
                note = checkpoint_note(pods) or "; the trainer writes a checkpoint, then the job waits in its queue"
                return Observed(Phase.PREEMPTED, reason, message + note, start, None, attempts)
            if reason == REQUEUED:
                message += checkpoint_note(pods)
            return Observed(Phase.QUEUED, reason, message, start, None, attempts)
        return Observed(Phase.PENDING, "Resuming", "resuming the training Job", start, None, attempts)

    for pod in pods:
        if (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            return Observed(Phase.RUNNING, "Training", "the trainer is running", start, None, attempts)
        if (pod.get("status") or {}).get("phase") == "Succeeded":
            # The Job controller marks the Job Complete a moment after its pod succeeded.
            return Observed(Phase.RUNNING, "Finishing", "the trainer finished; completing the Job", start, None,
                            attempts)

    for pod in pods:
        phase = (pod.get("status") or {}).get("phase")
        if phase not in (None, "Pending"):
            continue
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return Observed(Phase.PENDING, cond.get("reason") or "Unschedulable",
                                cond.get("message") or "the pod cannot be scheduled", start, None, attempts)
        waiting = waiting_state(pod) or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            return Observed(Phase.PENDING, "ImagePullError",
                            f"cannot pull the trainer image: {waiting.get('message') or waiting['reason']}",
                            start, None, attempts)
        missing = MISSING_SECRET.search(str(waiting.get("message") or ""))
        if waiting.get("reason") == "CreateContainerConfigError" and missing:
            namespace = (job.get("metadata") or {}).get("namespace")
            return Observed(Phase.PENDING, "MissingDependency",
                            f"waiting for Secret {missing.group(1)} in namespace {namespace}; the job starts "
                            "once it exists", start, None, attempts)
        if waiting.get("reason") in CONTAINER_START_REASONS:
            return Observed(Phase.PENDING, waiting["reason"],
                            f"the training pod cannot start: {waiting.get('message') or waiting['reason']}",
                            start, None, attempts)
        return Observed(Phase.PENDING, "Starting", "the training pod is starting", start, None, attempts)

    described = next((d for d in (describe_failure(p) for p in pods) if d), None)
    if described:
        return Observed(Phase.PENDING, "Retrying", f"retrying after a failed attempt: {described[1]}",
                        start, None, attempts)
    return Observed(Phase.PENDING, "Starting", "waiting for the training pod", start, None, attempts)


def pod_rejected(observed: Observed, message: str) -> Observed:
    """A Job whose pod the Job controller cannot create (its FailedCreate event: a ResourceQuota,
    a LimitRange, Pod Security): Pending, reason PodRejected, with the API server's words."""
    return dataclasses.replace(observed, reason="PodRejected",
                               message=f"the Job controller cannot create the training pod: {message}"[:1024])


def conditions(phase: Phase, reason: str, message: str, generation: int, previous: list[Json],
               now: str, gate: GateResult | None = None) -> list[Json]:
    """Ready / Reconciling / Stalled for a phase, and Promotable for a job with a promotion gate once
    it has a verdict; lastTransitionTime kept while a status holds.

    A failed gate makes a Succeeded job not Ready and Stalled (reason EvaluationGateFailed), so that
    kstatus-based tools (Flux, kubectl wait --for=condition=Ready) see it as failed, as Argo CD's
    health check does (examples/argocd-application.yaml)."""
    refused = gate is not None and not gate.passed
    ready = phase == Phase.SUCCEEDED and not refused
    stalled = phase == Phase.FAILED or (phase == Phase.SUCCEEDED and refused) or reason == NO_PROGRESS
    reconciling = phase in RECONCILING
    if phase == Phase.SUCCEEDED and refused:
        assert gate is not None
        reason, message = GATE_FAILED, gate.message
    wanted = [
        ("Ready", ready, "Succeeded" if ready else reason, "training finished" if ready else message),
        ("Reconciling", reconciling, reason if reconciling else phase.value, message if reconciling else ""),
        ("Stalled", stalled, reason if stalled else phase.value, message if stalled else ""),
    ]
    if gate is not None:
        wanted.append(("Promotable", gate.passed, "GatePassed" if gate.passed else GATE_FAILED, gate.message))
    before = {c["type"]: c for c in previous}
    out = []
    for kind, value, why, text in wanted:
        status = "True" if value else "False"
        old = before.get(kind)
        since = old["lastTransitionTime"] if old and old.get("status") == status else now
        out.append({"type": kind, "status": status, "reason": why, "message": text,
                    "lastTransitionTime": since, "observedGeneration": generation})
    return out


def summary_fields(summary: Json) -> Json:
    """Progress, metrics and artifacts from the trainer's final summary (kubetune_contract.events)."""
    try:
        return Summary.model_validate(summary).status_fields()
    except ValidationError:
        return {}  # not our trainer's summary: the status keeps what the reports said


def as_patch(status: FineTuneJobStatus) -> Json:
    """The status as a merge patch: the fields it sets, by their API names."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def gate_verdict(gate: GateSpec, evaluation: Json | None) -> GateResult:
    """The promotion gate's verdict on the evaluation the trainer reported. A finished run that
    reported no evaluation fails the gate: nothing unmeasured is promotable."""
    if not evaluation:
        return GateResult(passed=False, message="gate failed: the trainer reported no evaluation results")
    return check_gate(gate, Evaluation.model_validate(evaluation).metrics)


def build_status(observed: Observed, *, previous: Json, generation: int, job_name: str | None,
                 now: str, gate: GateSpec | None = None) -> FineTuneJobStatus:
    """The complete status to write for an observation; ``gate``: the job's evaluation.gate, checked
    once the run has succeeded (evaluation.gate.failJob: a failed gate fails the job)."""
    fields = summary_fields(observed.summary) if observed.summary else {}
    verdict = None
    if observed.phase == Phase.SUCCEEDED and gate is not None:
        fields.setdefault("evaluation", previous.get("evaluation"))
        verdict = gate_verdict(gate, fields["evaluation"])
        fields["evaluation"] = {**(fields["evaluation"] or {}), "gate": verdict.model_dump(by_alias=True)}
        if not verdict.passed and gate.fail_job:
            observed = dataclasses.replace(observed, phase=Phase.FAILED, reason=GATE_FAILED,
                                           message=f"training finished, but {verdict.message}")
    status: Json = {
        "phase": observed.phase.value,
        "reason": observed.reason,
        "message": observed.message,
        "observedGeneration": generation,
        "jobName": job_name,
        "conditions": conditions(observed.phase, observed.reason, observed.message, generation,
                                 previous.get("conditions") or [], now, verdict),
    }
    start = previous.get("startTime") or rfc3339(observed.start_time)
    if start:
        status["startTime"] = start
    if observed.completion_time and observed.phase in TERMINAL:
        status["completionTime"] = rfc3339(observed.completion_time)
    if observed.attempts:
        status["attempts"] = observed.attempts
    if previous.get("stallRestarts"):
        status["stallRestarts"] = previous["stallRestarts"]
    # progress and metrics come from trainer reports (reports.py) while the job runs; merge
    # patches leave them alone. The final summary, when there is one, completes them.
    status.update({k: v for k, v in fields.items() if v})
    return FineTuneJobStatus.model_validate(status)


def refused_status(reason: str, message: str, *, previous: Json, generation: int, now: str) -> FineTuneJobStatus:
    """Failed before any Job exists: InvalidSpec, PolicyViolation, or WontFit (the estimate exceeds
    the GPU memory)."""
    return FineTuneJobStatus.model_validate({
        "phase": Phase.FAILED.value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions(Phase.FAILED, reason, message, generation, previous.get("conditions") or [], now),
    })


def waiting_status(reason: str, message: str, *, previous: Json, generation: int, now: str) -> FineTuneJobStatus:
    """Status while something the pod needs (a Secret, a PVC) does not exist yet."""
    status = {k: v for k, v in previous.items() if k in ("startTime", "attempts", "jobName")}
    status.update({
        "phase": Phase.PENDING.value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions(Phase.PENDING, reason, message, generation, previous.get("conditions") or [], now),
    })
    return FineTuneJobStatus.model_validate(status)
