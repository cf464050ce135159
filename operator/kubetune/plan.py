"""What one reconcile pass does, as data: `plan(world) -> Plan`. Pure: no API call, no clock, no global.

A `World` is what the pass observed: the FineTuneJob, the Job of its name, the time, the operator's
settings, and the facts read so far. When the plan needs a fact it was not given (the namespace,
a preset, the PVCs, the GPU-memory estimate, the Kueue Workload, the pods, the Job controller's
refusal), `World.need` raises `Need`; the reconciler (reconcile.py) reads that fact and plans
again. So every read is one the decision needs, and the decision itself is a plain function of
what was read: "nothing to do" is a plan without actions.

A `Plan` is an ordered list of actions (create the children, suspend the Job, pause the Workload,
remove the children, write the status, post Events), the phase it leaves the job in, and when to
look again (`retry`). The status is written at most once per pass, and only when it changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from kubetune import kueue, preflight, presets, render, status
from kubetune.api import TERMINAL, AppliedPreset, FineTuneJobSpec, FineTuneJobStatus, Phase, name_problem
from kubetune.presets import PresetLimits
from kubetune.settings import Settings
from kubetune_contract.config import StorageSpec

Json = dict[str, Any]

PROBLEM_REASONS = ("Unschedulable", "ImagePullError", "Retrying", "MissingDependency", "NameConflict",
                   "JobRejected", "PodRejected", "Inadmissible", status.NO_PROGRESS, *status.CONTAINER_START_REASONS)
REJECTED_RETRY_SECONDS = 30.0  # a rejected child is tried again this often (and at once on a spec change)
WAIT_SECONDS = 5.0  # a job waiting for a PVC or a preset is looked at again this often
NAME_CONFLICT_SECONDS = 3.0
WORKLOAD_SECONDS = 2.0
STALLED_POD_GRACE_SECONDS = 30  # a stalled trainer cannot checkpoint on SIGTERM: its pods get this long

# The reason of the Event a change of status is told with: a phase's own name, "Started" when the
# trainer starts, and the status's reason for a Pending job and a change of reason within a phase
# (Running/Finishing: the trainer finished and the Job is completing).
EVENT_REASONS: dict[tuple[str, str], str] = {(Phase.RUNNING, "Training"): "Started"}


def event_reason(phase: str, reason: str, previous_phase: str | None) -> str:
    """The Event reason for a job that reached (phase, reason) from previous_phase."""
    if (phase, reason) in EVENT_REASONS:
        return EVENT_REASONS[(phase, reason)]
    return reason if phase in (Phase.PENDING, Phase.RUNNING) or phase == previous_phase else phase


# --- facts: what a plan may ask to be read ------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """A read the plan needs (PodsOf from the operator's watch caches; the others from the API)."""


@dataclass(frozen=True)
class NamespaceOf(Fact):
    namespace: str


@dataclass(frozen=True)
class PresetNamed(Fact):
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True)
class MissingClaims(Fact):
    namespace: str
    claims: tuple[str, ...]


@dataclass(frozen=True)
class EstimateOf(Fact):
    """The GPU-memory verdict of (uid, generation); spec and storage say how to compute it."""

    uid: str
    generation: int
    spec: FineTuneJobSpec = field(compare=False, hash=False)
    storage: StorageSpec = field(compare=False, hash=False)


@dataclass(frozen=True)
class WorkloadOf(Fact):
    namespace: str
    job_uid: str


@dataclass(frozen=True)
class PodsOf(Fact):
    job_uid: str
    job: Json = field(compare=False, hash=False)


@dataclass(frozen=True)
class PodRefusal(Fact):
    namespace: str
    job_uid: str


class Need(Exception):
    """The plan needs `fact`: read it, and plan again."""

    def __init__(self, fact: Fact) -> None:
        super().__init__(fact)
        self.fact = fact


@dataclass(frozen=True)
class World:
    """What one pass observed."""

    ftj: Json
    job: Json | None  # the Job of the FineTuneJob's name, whoever owns it
    now: str  # RFC 3339
    settings: Settings
    facts: Mapping[Fact, Any] = field(default_factory=dict)
    operator_since: str | None = None  # when this operator started: the stall check's clock starts no earlier

    def need(self, fact: Fact) -> Any:
        if fact not in self.facts:
            raise Need(fact)
        return self.facts[fact]

    @property
    def meta(self) -> Json:
        return dict(self.ftj["metadata"])

    @property
    def previous(self) -> Json:
        return dict(self.ftj.get("status") or {})

    @property
    def generation(self) -> int:
        return int(self.meta.get("generation") or 1)

    @property
    def finished(self) -> bool:
        return self.previous.get("phase") in TERMINAL


# --- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """Create (or adopt) the children in order, the Job last. `announce`: post the Created Event
    when the Job is new (else the status Event that follows tells it)."""

    objects: tuple[Json, ...]
    announce: bool = False


@dataclass(frozen=True)
class SetJobSuspend:
    namespace: str
    name: str
    suspend: bool


@dataclass(frozen=True)
class PatchWorkload:
    namespace: str
    name: str
    patch: Json


@dataclass(frozen=True)
class DeleteChildren:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class DeletePods:
    """Delete the pods of a Job (a stalled run); the Job replaces them."""

    namespace: str
    job_uid: str
    grace_seconds: int = STALLED_POD_GRACE_SECONDS


@dataclass(frozen=True)
class Account:
    """What one attempt of a job cost, counted once when it ends (metrics.account): its pod's run
    time, times the GPUs it held."""

    namespace: str
    preset: str  # "" without one
    queue: str  # "" without one
    outcome: str  # succeeded, failed, preempted or suspended
    seconds: float
    gpus: int


@dataclass(frozen=True)
class WriteStatus:
    """Write the status: the fields it sets replace the previous ones (a merge patch)."""

    status: FineTuneJobStatus


@dataclass(frozen=True)
class PostEvent:
    type: str  # Normal or Warning
    reason: str
    message: str


Action = Create | SetJobSuspend | PatchWorkload | DeleteChildren | DeletePods | WriteStatus | PostEvent | Account


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    phase: str | None = None  # the phase the job is in after the pass (metrics, the report server)
    retry: tuple[str, float] | None = None  # (why, seconds): look again then
    warning: str | None = None  # for the operator's log, on every pass that plans it


def owned_by(obj: Json, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def seconds_between(earlier: str, later: str) -> float:
    """Seconds from one RFC 3339 timestamp to another."""
    def parse(stamp: str) -> dt.datetime:
        return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    return (parse(later) - parse(earlier)).total_seconds()


def applied_generation(ftj: Json, job: Json) -> int:
    """status.observedGeneration: the FineTuneJob's generation if the Job runs its current spec
    (edits of suspend and ttlSecondsAfterFinished are applied live); else the last generation that
    was applied, so an edit the running Job cannot take (resources, scheduling, image...) shows as
    not observed."""
    generation = int(ftj["metadata"].get("generation") or 1)
    annotations = job["metadata"].get("annotations") or {}
    made_from = annotations.get(render.SPEC_HASH_ANNOTATION)
    if made_from is None or made_from == render.spec_hash(ftj):
        return generation
    applied = int((ftj.get("status") or {}).get("observedGeneration") or 0)
    return max(applied, int(annotations.get(render.GENERATION_ANNOTATION) or 1))


def validation_message(error: ValidationError) -> str:
    """'spec.<field>: <problem>' for each error, on one line."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"spec.{where}: {item['msg']}" if where else f"spec: {item['msg']}")
    return "; ".join(parts)


# --- status transitions --------------------------------------------------------------------------


def with_preset(new: FineTuneJobStatus, applied: Json | None) -> FineTuneJobStatus:
    """The status with the preset its Job was made with (status.preset)."""
    return new.model_copy(update={"preset": AppliedPreset.model_validate(applied)}) if applied else new


def transition(world: World, new: FineTuneJobStatus, retry: tuple[str, float] | None = None) -> Plan:
    """Write `new` if it changes the status; post an Event when phase or reason changed."""
    previous = world.previous
    phase, reason = str(new.phase), new.reason or ""
    if all(previous.get(k) == v for k, v in status.as_patch(new).items()):
        return Plan(phase=phase, retry=retry)
    actions: list[Action] = [WriteStatus(new)]
    # A stalled job whose pods are being replaced stays stalled: one Event for the stall.
    told = reason == status.NO_PROGRESS == previous.get("reason")
    if (phase, reason) != (previous.get("phase"), previous.get("reason")) and not told:
        if previous.get("phase") == Phase.SUSPENDED and phase != Phase.SUSPENDED:
            actions.append(PostEvent("Normal", "Resumed", "resumed"))
        warn = phase == Phase.FAILED or reason in PROBLEM_REASONS
        message = new.message or phase
        if phase == Phase.FAILED:
            message = f"{reason}: {message}"
        if phase == Phase.SUCCEEDED and new.metrics is not None and new.metrics.eval_loss is not None:
            message = f"training finished; final eval loss {new.metrics.eval_loss:.4f}"
        actions.append(PostEvent("Warning" if warn else "Normal",
                                 event_reason(phase, reason, previous.get("phase")), message))
        gate = new.evaluation.gate if new.evaluation is not None else None
        if phase == Phase.SUCCEEDED and gate is not None:
            actions.append(PostEvent("Normal" if gate.passed else "Warning",
                                     "Promotable" if gate.passed else status.GATE_FAILED, gate.message))
        pushed = new.artifacts.oci_reference if new.artifacts is not None else None
        if phase == Phase.SUCCEEDED and pushed:
            actions.append(PostEvent("Normal", "Pushed", f"pushed the adapter to {pushed}"))
    return Plan(tuple(actions), phase, retry)


def refused(world: World, message: str, reason: str = "InvalidSpec", applied: Json | None = None) -> Plan:
    """Failed before any Job exists: InvalidSpec, PolicyViolation or WontFit."""
    new = status.refused_status(reason, message, previous=world.previous, generation=world.generation,
                                now=world.now)
    return transition(world, with_preset(new, applied))


def waiting(world: World, reason: str, message: str, delay: float) -> Plan:
    """Pending for something to appear (a PVC, a preset, a name, an estimate): look again in `delay`."""
    new = status.waiting_status(reason, message, previous=world.previous, generation=world.generation,
                                now=world.now)
    return transition(world, new, retry=(message, delay))


def name_taken(world: World, what: str) -> Plan:
    """A child's name is taken by an object this FineTuneJob does not own: wait, and say so."""
    message = (f"{what} exists and belongs to another owner (a deleted FineTuneJob of the same name "
               "is still being cleaned up, or a name conflict); the job starts once it is gone")
    return waiting(world, "NameConflict", message, NAME_CONFLICT_SECONDS)


def rejected(world: World, api_message: str) -> Plan:
    """The API server refused a child (invalid, or denied by a webhook or a quota): retried later."""
    message = f"the API server rejected a child object of this job: {api_message}"
    return waiting(world, "JobRejected", message, REJECTED_RETRY_SECONDS)


# --- the plan ------------------------------------------------------------------------------------

Resolved = tuple[Json | None, Json, PresetLimits | None]  # applied preset, its defaults, its limits


def plan(world: World) -> Plan:
    """What to do for a FineTuneJob in `world`. Raises `Need` for a fact it must have read."""
    meta, raw, previous = world.meta, world.ftj.get("spec") or {}, world.previous
    uid, job_name = meta["uid"], render.job_name(meta["name"])
    job = world.job
    stranger = job is not None and not owned_by(job, uid) and world.finished
    if stranger:
        job = None  # a finished job stays finished: a Job of its name that is not its own is ignored
    if job is not None and owned_by(job, uid):
        # The Job exists: its effective spec was frozen with it (later preset edits do not count).
        applied, defaults = render.frozen_preset(job)
        limits = None
    elif world.finished:
        applied, defaults, limits = None, {}, None  # finished: only live fields (ttl) still matter
    else:
        resolved = resolve_preset(world)
        if isinstance(resolved, Plan):
            return resolved
        applied, defaults, limits = resolved
    try:
        spec = FineTuneJobSpec.model_validate(presets.effective_spec(raw, defaults))
    except ValidationError as error:
        if world.finished:
            return Plan()  # a finished job keeps its outcome, even if validation rules changed since
        return invalid(world, validation_message(error), applied)
    if job is None and not world.finished:
        bad_name = name_problem(meta["name"], spec)
        if bad_name:
            return invalid(world, bad_name, applied)
        where = f"{applied['kind']}/{applied['name']}" if applied else None
        broken = presets.violations(spec, raw, limits, preset=where, defaults=defaults,
                                    restrict_images_and_accounts=world.settings.restrict_images_and_service_accounts)
        if broken:
            return refused(world, "; ".join(broken), "PolicyViolation", applied)

    if job is not None and not owned_by(job, uid):
        # A Job of that name that is not ours: usually the previous FineTuneJob of the same name,
        # still being garbage-collected. Never observe or adopt it.
        return name_taken(world, f"Job {job_name}")
    if job is None and world.finished:
        # Finished, and the children were removed (ttlSecondsAfterFinished) or deleted by hand:
        # the status stays as it was and nothing is created again.
        if stranger:
            return expire(world, spec) or Plan(phase=previous["phase"])  # its own children still go at their time
        if spec.ttl_seconds_after_finished is not None and not previous.get("cleanupTime"):
            return Plan((WriteStatus(FineTuneJobStatus(cleanup_time=world.now)),), previous["phase"])
        return Plan(phase=previous["phase"])
    if world.finished:
        expired = expire(world, spec)
        if expired is not None:
            return expired
    if job is None:
        return start(world, spec, applied, defaults)
    return follow(world, spec, job, applied)


def resolve_preset(world: World) -> Resolved | Plan:
    """The preset of a job not yet started: ({kind, name, generation}, its defaults, its limits), or
    (None, {}, None) without one; else the plan that fails the job (a bad reference or preset) or
    waits for a preset that does not exist yet, as for a missing PVC."""
    meta, raw = world.meta, world.ftj.get("spec") or {}
    namespace = world.need(NamespaceOf(meta["namespace"]))
    try:
        ref = presets.preset_ref(raw, namespace)
    except (ValueError, ValidationError) as error:
        return refused(world, str(error))
    if ref is None and presets.preset_required(namespace):
        return refused(world, f"spec.preset: namespace {meta['namespace']} requires a preset (label "
                              f"{presets.PRESET_REQUIRED_LABEL}=true); name one in spec.preset", "PolicyViolation")
    if ref is None:
        return None, {}, None
    preset = world.need(PresetNamed(ref.kind, meta["namespace"], ref.name))
    where = f"{ref.kind} {ref.name}"
    if ref.kind == presets.KIND:
        where += f" in namespace {meta['namespace']}"
    if preset is None:
        return waiting(world, "MissingDependency", f"waiting for {where}; the job starts once it exists", WAIT_SECONDS)
    try:
        defaults = presets.preset_defaults(preset)
        limits = presets.FineTunePresetSpec.model_validate(preset.get("spec") or {}).limits
    except ValidationError as error:
        return refused(world, f"{where} is invalid: {validation_message(error).replace('spec.', 'preset spec.')}")
    applied = {"kind": ref.kind, "name": ref.name, "generation": int(preset["metadata"].get("generation") or 1)}
    if not presets.selects({**preset, "kind": ref.kind}, namespace):
        return refused(world, f"spec.preset: {ref.kind}/{ref.name} is not for namespace {meta['namespace']} "
                              "(its spec.namespaceSelector does not select it)", "PolicyViolation", applied)
    return applied, defaults, limits


def invalid(world: World, message: str, applied: Json | None) -> Plan:
    """The spec does not validate. Before any Job exists: Failed (InvalidSpec). A Job created when
    the spec was valid (an upgrade tightened the rules) keeps being tracked to its end."""
    job = world.job
    if job is None or not owned_by(job, world.meta["uid"]):
        return refused(world, message, applied=applied)
    raw, previous = world.ftj.get("spec") or {}, world.previous
    pods = world.need(PodsOf(job["metadata"]["uid"], job))
    observed = status.observe(job, pods, suspend=bool(raw.get("suspend")),
                              queued=bool((raw.get("scheduling") or {}).get("queueName")))
    shown = transition(world, status.build_status(
        observed, previous=previous, generation=int(previous.get("observedGeneration") or world.generation),
        job_name=render.job_name(world.meta["name"]), now=world.now))
    return replace(shown, warning=f"the spec no longer validates ({message}); following its running Job to the end")


def expire(world: World, spec: FineTuneJobSpec) -> Plan | None:
    """ttlSecondsAfterFinished: remove the children once the final status is written. None while
    it does not apply (no TTL, or no completion time).

    The operator does this itself rather than through the Job's own TTL, which could delete the Job
    before its outcome is recorded."""
    previous = world.previous
    ttl, finished = spec.ttl_seconds_after_finished, previous.get("completionTime")
    if ttl is None or not finished:
        return None
    if previous.get("cleanupTime"):
        return Plan(phase=previous["phase"])  # removed already; a watch cache may still show the Job
    left = ttl - seconds_between(finished, world.now)
    if left > 0:
        return Plan(phase=previous["phase"],
                    retry=(f"children are removed in {left:.0f}s (ttlSecondsAfterFinished)", left))
    meta = world.meta
    return Plan((DeleteChildren(meta["namespace"], meta["name"], meta["uid"]),
                 WriteStatus(FineTuneJobStatus(cleanup_time=world.now)),
                 PostEvent("Normal", "Cleaned", f"removed the Job and its pods {ttl}s after the end")),
                previous["phase"])


def start(world: World, spec: FineTuneJobSpec, applied: Json | None, defaults: Json) -> Plan:
    """A job without its Job: wait for what the pod needs, check the estimate, create the children
    (what the pod mounts first, the Job last) and show the status of the Job just made."""
    meta, settings, ftj = world.meta, world.settings, world.ftj
    claims = render.required_claims(spec)
    absent = world.need(MissingClaims(meta["namespace"], tuple(claims))) if claims else []
    if absent:
        message = f"waiting for {', '.join(absent)} in namespace {meta['namespace']}; the job starts once it exists"
        return waiting(world, "MissingDependency", message, WAIT_SECONDS)
    told: tuple[Action, ...] = ()
    if preflight.needs_estimate(spec):
        verdict = world.need(EstimateOf(meta["uid"], world.generation, spec, render.effective_storage(spec, settings)))
        if verdict is not None and verdict.outcome == "pending":
            return waiting(world, "Estimating", verdict.message, preflight.FETCH_DEADLINE_S + 1)
        if verdict is not None and verdict.outcome == "wontfit":
            return refused(world, verdict.message, "WontFit")
        if verdict is not None:
            told = (PostEvent("Normal", "Estimated" if verdict.outcome == "fits" else "EstimateSkipped",
                              verdict.message),)
    children = []
    if settings.report_url:
        children.append(render.render_report_secret(ftj, render.report_token(settings.report_key, meta["uid"])))
    config_map = render.render_config_map(ftj, spec, settings)
    children += [config_map, render.render_network_policy(ftj)]
    if spec.resources.distribution.nodes > 1:
        children.append(render.render_service(ftj))
    job = render.render_job(ftj, spec, settings, config_map, render.preset_annotations(applied, defaults))
    children.append(job)
    queued = kueue.queued(job)
    observed = status.observe(job, [], suspend=spec.suspend, queued=queued,
                              admission=kueue.admission(None) if queued else None)
    new = status.build_status(observed, previous=world.previous, generation=applied_generation(ftj, job),
                              job_name=job["metadata"]["name"], now=world.now)
    shown = transition(world, with_preset(new, applied))
    # A Job that starts Pending: one Event tells both, Created with the status it starts in. Queued
    # or Suspended at once keep their own Event after Created.
    told_status = [a for a in shown.actions
                   if isinstance(a, PostEvent) and a.reason != "Resumed" and new.phase == Phase.PENDING]
    actions = tuple(PostEvent(a.type, "Created", f"created Job {job['metadata']['name']}: {new.message}")
                    if a in told_status else a for a in shown.actions)
    return Plan((*told, Create(tuple(children), announce=not told_status), *actions), shown.phase)


def follow(world: World, spec: FineTuneJobSpec, job: Json, applied: Json | None) -> Plan:
    """A job with its Job: apply spec.suspend (to the Job, or to Kueue's Workload), and show the
    status the Job and its pods say."""
    actions: list[Action] = []
    done, queued = status.finished(job), kueue.queued(job)
    job_meta = job["metadata"]
    if not done and not queued and bool(spec.suspend) != bool((job.get("spec") or {}).get("suspend")):
        # spec.suspend → Job.spec.suspend. A Job in a Kueue queue is left alone: Kueue alone
        # flips its suspend, and spec.suspend acts on its Workload.
        actions.append(SetJobSuspend(job_meta["namespace"], job_meta["name"], bool(spec.suspend)))
        job = {**job, "spec": {**(job.get("spec") or {}), "suspend": bool(spec.suspend)}}
    workload = None
    if queued and not done and (spec.suspend or (job.get("spec") or {}).get("suspend")):
        # The Job waits for Kueue or is being suspended: its Workload's conditions say why, and
        # spec.suspend → its spec.active. An admitted, running Job needs no read.
        workload = world.need(WorkloadOf(job_meta["namespace"], job_meta["uid"]))
        patch = kueue.active_patch(workload, suspend=bool(spec.suspend)) if workload is not None else None
        if workload is not None and patch is not None:
            actions.append(PatchWorkload(job_meta["namespace"], workload["metadata"]["name"], patch))
            workload = kueue.merged(workload, patch)
    pods = world.need(PodsOf(job_meta["uid"], job))
    observed = status.observe(job, pods, suspend=bool(spec.suspend), queued=queued,
                              admission=kueue.admission(workload) if queued else None)
    if observed.reason == "Starting" and not pods:  # the Job has made no pod: did it fail to?
        refusal = world.need(PodRefusal(job_meta["namespace"], job_meta["uid"]))
        if refusal:
            observed = status.pod_rejected(observed, refusal)
    stall, left = stall_check(spec, observed, world.previous, pods, world.now, world.operator_since)
    if stall is None and world.previous.get("reason") == status.NO_PROGRESS and observed.phase == Phase.PENDING \
            and observed.reason in ("Starting", "Retrying"):
        # The stalled pods are being replaced: the job stays stalled until a new pod runs.
        observed = dataclasses.replace(observed, reason=status.NO_PROGRESS,
                                       message=str(world.previous.get("message") or observed.message))
    restarted = False
    if stall is not None:
        restarts = int(world.previous.get("stallRestarts") or 0)
        again = world.previous.get("reason") == status.NO_PROGRESS  # the same stall, its pods still stopping
        if spec.training.stall_action == "restart" and restarts >= spec.backoff_limit and not again:
            stall = stall.replace("its pods are restarted to resume from the last checkpoint",
                                  f"not restarted again: {restarts} stall restarts already (backoffLimit)")
        elif spec.training.stall_action == "restart":
            actions.append(DeletePods(job_meta["namespace"], job_meta["uid"]))
            restarted = not again
            seconds = attempt_seconds(pods, world.now)
            if restarted and seconds is not None:
                # The stalled attempt ends here: lost work (its replacement may run before a pass
                # sees the job leave Running).
                actions.append(Account(job_meta["namespace"], (applied or {}).get("name", ""),
                                       spec.scheduling.queue_name or "", "failed", seconds,
                                       spec.resources.gpus * spec.resources.distribution.nodes))
        observed = dataclasses.replace(observed, reason=status.NO_PROGRESS, message=stall)
    new = status.build_status(observed, previous=world.previous, generation=applied_generation(world.ftj, job),
                              job_name=job_meta["name"], now=world.now, gate=spec.evaluation.gate)
    if restarted:
        new = new.model_copy(update={"stall_restarts": int(world.previous.get("stallRestarts") or 0) + 1})
    retry = None
    if queued and spec.suspend and workload is None and not done:
        # Suspended before Kueue made the Workload: deactivate it as soon as it exists.
        retry = ("waiting for Kueue's Workload of the Job to deactivate it", WORKLOAD_SECONDS)
    elif left is not None:
        retry = ("the stall check (training.stallTimeoutSeconds)", left + 1)
    shown = transition(world, with_preset(new, applied), retry)
    if any(isinstance(a, WriteStatus) for a in shown.actions):
        shown = Plan((*shown.actions, *account(world, spec, str(new.phase), pods, applied)), shown.phase, shown.retry)
    return Plan((*actions, *shown.actions), shown.phase, shown.retry)


def stall_check(spec: FineTuneJobSpec, observed: status.Observed, previous: Json, pods: list[Json],
                now: str, operator_since: str | None = None) -> tuple[str | None, float | None]:
    """(why the run is stalled, or None; seconds until it would be, when it is training).

    A Running job is stalled when its trainer last said it was training (progress.activity) and the
    operator has heard nothing from it for training.stallTimeoutSeconds: while steps advance the trainer
    reports at least once a minute. The clock starts again with each new pod, so a replacement that
    is still starting up is not stalled on its predecessor's account, nor a run whose reports went
    unheard while the operator was away (`operator_since`)."""
    timeout = spec.training.stall_timeout_seconds
    progress = previous.get("progress") or {}
    if (timeout is None or observed.phase != Phase.RUNNING or observed.reason not in ("Training", status.NO_PROGRESS)
            or progress.get("activity") != "training" or not progress.get("updatedAt")):
        return None, None
    started = [str(p["status"]["startTime"]) for p in pods
               if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("startTime")]
    heard = str(progress["updatedAt"])
    since = [operator_since] if operator_since else []
    idle = min(seconds_between(stamp, now) for stamp in (heard, *started, *since))
    if idle < timeout:
        return None, timeout - idle
    action = ("its pods are restarted to resume from the last checkpoint" if spec.training.stall_action == "restart"
              else "left running (training.stallAction none)")
    return (f"no training step for {int(idle)}s (training.stallTimeoutSeconds {timeout}); the last report was "
            f"at step {progress.get('step')} at {heard}: {action}"), None


OUTCOMES = {Phase.SUCCEEDED: "succeeded", Phase.FAILED: "failed", Phase.PREEMPTED: "preempted",
            Phase.QUEUED: "preempted", Phase.SUSPENDED: "suspended"}
"""How an attempt that stopped running ended, by the phase the job went to (any other: failed, e.g.
Pending and Retrying after a pod failure)."""


def account(world: World, spec: FineTuneJobSpec, phase: str, pods: list[Json],
            applied: Json | None) -> tuple[Account, ...]:
    """The attempt that ended with this status write, to count (once: the write moves the phase on):
    the job ran before and does not now, or it finished without ever being seen running."""
    before = world.previous.get("phase")
    if world.previous.get("reason") == status.NO_PROGRESS and phase != Phase.RUNNING:
        return ()  # the stalled attempt was counted when its pods were restarted
    finished = (Phase.SUCCEEDED, Phase.FAILED)
    ended = (before == Phase.RUNNING and phase != Phase.RUNNING) or (
        phase in finished and before not in (Phase.RUNNING, *finished))
    seconds = attempt_seconds(pods, world.now) if ended else None
    if seconds is None:
        return ()
    meta, resources = world.meta, spec.resources
    return (Account(meta["namespace"], (applied or {}).get("name", ""), spec.scheduling.queue_name or "",
                    OUTCOMES.get(Phase(phase), "failed"), seconds, resources.gpus * resources.distribution.nodes),)


def attempt_seconds(pods: list[Json], now: str) -> float | None:
    """How long the attempt that ended ran: the newest pod whose trainer has terminated (else the
    newest pod, still stopping), from its start to its container's end (or now)."""
    def ends(pod: Json) -> list[str]:
        return [str(c["state"]["terminated"].get("finishedAt") or now)
                for c in pod["status"].get("containerStatuses") or [] if (c.get("state") or {}).get("terminated")]

    started = [p for p in pods if (p.get("status") or {}).get("startTime")]
    if not started:
        return None
    ended = [p for p in started if ends(p)]
    attempt = max(ended or started, key=lambda p: p["status"]["startTime"])
    return max(0.0, seconds_between(attempt["status"]["startTime"], max(ends(attempt), default=now)))
