"""One level-based reconcile of a FineTuneJob: compare desired and observed, act, write status.

Called by every handler (create, resume, spec update, child Job/Pod events, periodic resync), so
the result never depends on which event arrived or whether the operator restarted in between:
children have deterministic names (create-or-adopt), and the status is recomputed from the Job
and its Pods.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, cast

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune import kueue, metrics, preflight, presets, render, status
from kubetune.api import TERMINAL, FineTuneJobSpec, Phase, name_problem
from kubetune.kube import Kube, NotOwned, api_message, now
from kubetune.presets import PresetLimits
from kubetune.settings import Settings
from kubetune_contract.config import StorageSpec

Json = dict[str, Any]
Resolved = tuple[Json | None, Json, PresetLimits | None]  # applied preset, its defaults, its limits
log = logging.getLogger("kubetune.reconcile")

PROBLEM_REASONS = ("Unschedulable", "ImagePullError", "Retrying", "MissingDependency", "NameConflict",
                   "JobRejected", "PodRejected", "Inadmissible", *status.CONTAINER_START_REASONS)
REJECTED_RETRY_SECONDS = 30.0  # a rejected child is tried again this often (and at once on a spec change)

# The reason of the Event a change of status is told with: a phase's own name, "Started" when the
# trainer starts, and the status's reason for a Pending job and a change of reason within a phase
# (Running/Finishing: the trainer finished and the Job is completing).
EVENT_REASONS: dict[tuple[str, str], str] = {(Phase.RUNNING, "Training"): "Started"}


def event_reason(phase: str, reason: str, previous_phase: str | None) -> str:
    """The Event reason for a job that reached (phase, reason) from previous_phase."""
    if (phase, reason) in EVENT_REASONS:
        return EVENT_REASONS[(phase, reason)]
    return reason if phase in (Phase.PENDING, Phase.RUNNING) or phase == previous_phase else phase


class Retry(Exception):
    """Reconcile again later: something the job needs may appear (a Secret, a PVC)."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class Children(Protocol):
    """Where a reconcile reads a FineTuneJob's Job and Pods: the API (`Kube`), or the operator's
    watch caches (kopf indices, see handlers.py), which answer without a request."""

    def get_job(self, namespace: str, name: str) -> Json | None: ...

    def list_pods(self, namespace: str, job: Json) -> list[Json]: ...


class Cache(Children, Protocol):
    """The watch caches, FineTuneJobs included."""

    def get_finetunejob(self, namespace: str, name: str) -> Json | None: ...


class NeedsAction(Exception):
    """A check on cached objects found something to do: reconcile for real (fresh read, then act)."""


class _Refuse:
    """The API as seen by a check on cached objects: any call at all means there is work to do."""

    def __getattr__(self, name: str) -> Any:
        raise NeedsAction(name)


def owned_by(obj: Json, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def seconds_since(stamp: str) -> float:
    """Seconds from an RFC 3339 UTC timestamp until now."""
    then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (dt.datetime.now(dt.UTC) - then).total_seconds()


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


_REFUSE = _Refuse()


class Reconciler:
    """Reconciles FineTuneJobs, one pass at a time per object.

    A call for an object whose reconcile is already running does not wait: it marks the object
    dirty and returns, and the running pass goes round once more (a work queue's dirty set). So no
    thread ever waits on a lock held across a network call.
    """

    def __init__(self, kube: Kube, settings: Settings,
                 on_phase: Callable[[str, str, str, str, int | None], None] | None = None) -> None:
        self._kube = kube
        self.settings = settings
        self.cache: Cache | None = None  # handlers.py sets its watch caches
        self._checking = threading.local()  # .active: this thread runs a check on cached objects
        # (namespace, name, uid, phase, progress step in status): lets the report server track jobs
        self.on_phase = on_phase
        self._guard = threading.Lock()  # guards the two collections below; never held across I/O
        self._running: dict[tuple[str, str], float] = {}  # key → start of the pass (monotonic)
        self._dirty: set[tuple[str, str]] = set()
        self.fetch_config: Callable[[str, StorageSpec, str | None], Json] = preflight.remote_config
        self.estimates = preflight.Estimates()  # GPU memory checks: network reads off the reconcile path

    @property
    def kube(self) -> Kube:
        """The API; during a check on cached objects, a stand-in that refuses every call."""
        return cast(Kube, _REFUSE) if getattr(self._checking, "active", False) else self._kube

    @property
    def children(self) -> Children:
        return self.cache if self.cache is not None else self._kube

    def __call__(self, namespace: str, name: str, *, fresh: bool = False) -> None:
        """Reconcile a FineTuneJob. With watch caches and unless `fresh`, first check it on cached
        objects only: a pass that would change nothing (most Job and Pod events) costs no request."""
        key = (namespace, name)
        with self._guard:
            if key in self._running:
                self._dirty.add(key)
                return
            self._running[key] = time.monotonic()
        try:
            while True:
                self._once(namespace, name, fresh)
                fresh = False
                with self._guard:
                    if key not in self._dirty:
                        break
                    self._dirty.discard(key)
                    self._running[key] = time.monotonic()
        finally:
            with self._guard:
                self._running.pop(key, None)
                self._dirty.discard(key)

    def reconcile_soon(self, namespace: str, name: str) -> None:
        """Reconcile from a thread of the operator's own (an estimate that finished): what cannot
        be done now is left to the timers, as for an event."""
        try:
            self(namespace, name, fresh=True)
        except Retry:
            pass
        except Exception:
            log.exception("%s/%s: reconcile after the estimate failed; the resync retries it", namespace, name)

    def _settled(self, namespace: str, name: str) -> bool:
        """True when the cached FineTuneJob, Job and Pods show nothing to do: the reconcile runs on
        them with an API that refuses every call, so any write, create or read means "act"."""
        cached = self.cache.get_finetunejob(namespace, name) if self.cache is not None else None
        if cached is None or cached["metadata"].get("deletionTimestamp"):
            return False
        self._checking.active = True
        try:
            self._reconcile({**cached})  # a copy: _write replaces its status
        except NeedsAction:
            return False
        finally:
            self._checking.active = False
        metrics.RECONCILES.labels(kind="cached").inc()
        return True

    def _once(self, namespace: str, name: str, fresh: bool = False) -> None:
        started = time.monotonic()
        try:
            if not fresh and self._settled(namespace, name):
                return
            metrics.RECONCILES.labels(kind="full").inc()
            ftj = self.kube.get_finetunejob(namespace, name)
            if ftj is None or ftj["metadata"].get("deletionTimestamp"):
                return
            self._reconcile(ftj)
        except Retry:
            raise
        except Exception as error:
            metrics.RECONCILE_ERRORS.labels(kind=type(error).__name__).inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    def stalled(self, limit: float) -> str | None:
        """Why the operator is wedged (a reconcile pass running longer than `limit` seconds), else
        None. Every API call has a timeout, so a healthy pass always ends, even during an outage."""
        now = time.monotonic()
        with self._guard:
            oldest = min(self._running.items(), key=lambda item: item[1], default=None)
        if oldest is not None and now - oldest[1] > limit:
            (namespace, name), since = oldest
            return f"reconcile of {namespace}/{name} has been running for {now - since:.0f}s"
        return None

    def _write(self, ftj: Json, new: Json) -> None:
        """Patch the status if it changed; post an Event when phase or reason changed."""
        previous = ftj.get("status") or {}
        meta = ftj["metadata"]
        phase, reason = str(new["phase"]), str(new.get("reason") or "")
        metrics.observe_phase(meta["namespace"], meta["name"], phase)
        if self.on_phase:
            step = (previous.get("progress") or {}).get("step")
            self.on_phase(meta["namespace"], meta["name"], meta["uid"], phase, step)
        if all(previous.get(k) == v for k, v in new.items()):
            return
        self.kube.patch_status(meta["namespace"], meta["name"], new)
        metrics.STATUS_WRITES.labels(source="reconcile").inc()
        ftj["status"] = {**previous, **new}
        if (phase, reason) == (previous.get("phase"), previous.get("reason")):
            return
        if previous.get("phase") == Phase.SUSPENDED and phase != Phase.SUSPENDED:
            self.kube.event(ftj, "Normal", "Resumed", "resumed")
        warn = phase == Phase.FAILED or reason in PROBLEM_REASONS
        message = str(new.get("message") or phase)
        if phase == Phase.FAILED:
            message = f"{reason}: {message}"
        if phase == Phase.SUCCEEDED and (new.get("metrics") or {}).get("evalLoss") is not None:
            message = f"training finished; final eval loss {new['metrics']['evalLoss']:.4f}"
        self.kube.event(ftj, "Warning" if warn else "Normal", event_reason(phase, reason, previous.get("phase")),
                        message)
        log.info("%s/%s: %s (%s) %s", meta["namespace"], meta["name"], phase, reason, message)

    def _reconcile(self, ftj: Json) -> None:
        meta = ftj["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = int(meta.get("generation") or 1)
        previous = ftj.get("status") or {}

        job_name = render.job_name(name)
        raw = ftj.get("spec") or {}
        job = self.children.get_job(ns, job_name)
        stranger = job is not None and not owned_by(job, uid) and previous.get("phase") in TERMINAL
        if stranger:
            job = None  # a finished job stays finished: a Job of its name that is not its own is ignored
        if job is None and getattr(self._checking, "active", False) and previous.get("phase") not in TERMINAL:
            raise NeedsAction("create the children")
        if job is not None and owned_by(job, uid):
            # The Job exists: its effective spec was frozen with it (later preset edits do not count).
            applied, defaults = render.frozen_preset(job)
            limits = None
        elif previous.get("phase") in TERMINAL:
            applied, defaults, limits = None, {}, None  # finished: only live fields (ttl) still matter
        else:
            resolved = self._preset(ftj, previous, generation)
            if resolved is None:
                return
            applied, defaults, limits = resolved
        try:
            spec = FineTuneJobSpec.model_validate(presets.effective_spec(raw, defaults))
        except ValidationError as error:
            if previous.get("phase") in TERMINAL:
                return  # a finished job keeps its outcome, even if validation rules changed since
            self._invalid(ftj, job_name, validation_message(error), previous, generation, applied)
            return
        bad_name = name_problem(name, spec)
        if bad_name and job is None and previous.get("phase") not in TERMINAL:
            self._invalid(ftj, job_name, bad_name, previous, generation, applied)
            return
        if job is None and previous.get("phase") not in TERMINAL:
            where = f"{applied['kind']}/{applied['name']}" if applied else None
            broken = presets.violations(spec, raw, limits, preset=where, defaults=defaults,
                                        restrict_images_and_accounts=self.settings.restrict_images_and_service_accounts)
            if broken:
                self._policy_violation(ftj, "; ".join(broken), previous, generation, applied)
                return

        if job is not None and not owned_by(job, uid):
            # A Job of that name that is not ours: usually the previous FineTuneJob of the same
            # name, still being garbage-collected. Never observe or adopt it.
            self._wait_for_name(ftj, f"Job {job_name}", previous, generation)
        if job is None and previous.get("phase") in TERMINAL:
            # Finished, and the children were removed (ttlSecondsAfterFinished) or deleted by
            # hand: the status stays as it was and nothing is created again.
            metrics.observe_phase(ns, name, previous["phase"])
            if stranger:
                self._expire(ftj, spec, previous)  # its own children still go at their time (owner-checked)
            elif spec.ttl_seconds_after_finished is not None and not previous.get("cleanupTime"):
                self._mark_cleaned(ftj)
            return
        if previous.get("phase") in TERMINAL and self._expire(ftj, spec, previous):
            return

        if job is None:
            absent = self.kube.missing_claims(ns, render.required_claims(spec))
            if absent:
                message = (f"waiting for {', '.join(absent)} in namespace {ns}; "
                           "the job starts once it exists")
                self._write(ftj, status.waiting_status("MissingDependency", message, previous=previous,
                                                       generation=generation, now=now()))
                raise Retry(message, delay=5)
            if self._wont_fit(ftj, spec, previous, generation):
                return
            try:
                if self.settings.report_url:
                    token = render.report_token(self.settings.report_key, uid)
                    self.kube.create_or_adopt(render.render_report_secret(ftj, token), uid)
                config_map = render.render_config_map(ftj, spec, self.settings)
                self.kube.create_or_adopt(config_map, uid)
                self.kube.create_or_adopt(render.render_network_policy(ftj), uid)
                if spec.resources.distribution.nodes > 1:
                    self.kube.create_or_adopt(render.render_service(ftj), uid)
                desired = render.render_job(ftj, spec, self.settings, config_map,
                                            render.preset_annotations(applied, defaults))
                job, created = self.kube.create_or_adopt(desired, uid)
            except NotOwned as conflict:
                self._wait_for_name(ftj, conflict.what, previous, generation)
            except ApiException as rejected:
                if rejected.status not in (400, 403, 422):
                    raise  # the API server is in trouble, not the request: kopf retries
                # Invalid (a bad toleration or resource name), or denied by a webhook or a quota.
                message = f"the API server rejected a child object of this job: {api_message(rejected)}"
                self._write(ftj, status.waiting_status("JobRejected", message, previous=previous,
                                                       generation=generation, now=now()))
                raise Retry(message, delay=REJECTED_RETRY_SECONDS) from None
            if created:
                self.kube.event(ftj, "Normal", "Created", f"created Job {job_name}")
            workload = None
        else:
            job = self._sync_suspend(job, spec)
            workload = self._sync_workload(job, spec)

        pods = self.children.list_pods(ns, job)
        queued = kueue.queued(job)
        observed = status.observe(job, pods, suspend=spec.suspend, queued=queued,
                                  admission=kueue.admission(workload) if queued else None)
        if observed.reason == "Starting" and not pods:  # the Job has made no pod: did it fail to?
            refusal = self.kube.pod_creation_failure(ns, job["metadata"]["uid"])
            if refusal:
                observed = status.pod_rejected(observed, refusal)
        new = status.build_status(observed, previous=previous, generation=applied_generation(ftj, job),
                                  job_name=job_name, now=now())
        self._write(ftj, {**new, "preset": applied} if applied else new)
        if queued and spec.suspend and workload is None and not status.finished(job):
            # Suspended before Kueue made the Workload: deactivate it as soon as it exists.
            raise Retry("waiting for Kueue's Workload of the Job to deactivate it", delay=2)

    def _preset(self, ftj: Json, previous: Json, generation: int) -> Resolved | None:
        """The preset of a job not yet started: ({kind, name, generation}, its defaults, its limits),
        or (None, {}, None) without one. None when the job failed (a bad reference or preset); a
        preset that does not exist yet is waited for, like a missing PVC."""
        meta = ftj["metadata"]
        raw = ftj.get("spec") or {}
        namespace = self.kube.get_namespace(meta["namespace"])
        try:
            ref = presets.preset_ref(raw, namespace)
        except (ValueError, ValidationError) as error:
            self._write(ftj, status.invalid_spec_status(str(error), previous=previous, generation=generation,
                                                        now=now()))
            return None
        if ref is None and presets.preset_required(namespace):
            self._policy_violation(ftj, f"spec.preset: namespace {meta['namespace']} requires a preset (label "
                                        f"{presets.PRESET_REQUIRED_LABEL}=true); name one in spec.preset",
                                   previous, generation)
            return None
        if ref is None:
            return None, {}, None
        preset = self.kube.get_preset(ref.kind, meta["namespace"], ref.name)
        where = f"{ref.kind} {ref.name}"
        if ref.kind == presets.KIND:
            where += f" in namespace {meta['namespace']}"
        if preset is None:
            message = f"waiting for {where}; the job starts once it exists"
            self._write(ftj, status.waiting_status("MissingDependency", message, previous=previous,
                                                   generation=generation, now=now()))
            raise Retry(message, delay=5)
        try:
            defaults = presets.preset_defaults(preset)
            limits = presets.FineTunePresetSpec.model_validate(preset.get("spec") or {}).limits
        except ValidationError as error:
            message = f"{where} is invalid: {validation_message(error).replace('spec.', 'preset spec.')}"
            self._write(ftj, status.invalid_spec_status(message, previous=previous, generation=generation, now=now()))
            return None
        applied = {"kind": ref.kind, "name": ref.name, "generation": int(preset["metadata"].get("generation") or 1)}
        if not presets.selects({**preset, "kind": ref.kind}, namespace):
            self._policy_violation(ftj, f"spec.preset: {ref.kind}/{ref.name} is not for namespace {meta['namespace']} "
                                        "(its spec.namespaceSelector does not select it)", previous, generation,
                                   applied)
            return None
        return applied, defaults, limits

    def _policy_violation(self, ftj: Json, message: str, previous: Json, generation: int,
                          applied: Json | None = None) -> None:
        """Failed (PolicyViolation), before any Job exists: admission (the chart's
        ValidatingAdmissionPolicies) should have refused the job; it was bypassed or absent, or the
        preset or namespace changed since the job was applied."""
        self._write(ftj, {**status.invalid_spec_status(message, previous=previous, generation=generation, now=now(),
                                                       reason="PolicyViolation"),
                          **({"preset": applied} if applied else {})})

    def _wont_fit(self, ftj: Json, spec: FineTuneJobSpec, previous: Json, generation: int) -> bool:
        """The GPU memory check before the Job is created (kubetune.preflight): a run whose estimate
        exceeds the GPU's memory fails with WontFit and holds no GPU. Returns True when it did."""
        if not preflight.needs_estimate(spec):
            return False
        meta = ftj["metadata"]
        storage, fetch = render.effective_storage(spec, self.settings), self.fetch_config
        verdict = self.estimates.check(
            (meta["uid"], generation), lambda: preflight.check_job(spec, storage, fetch=fetch),
            on_done=lambda: self.reconcile_soon(meta["namespace"], meta["name"]))
        if verdict is None:
            return False
        if verdict.outcome == "pending":
            self._write(ftj, status.waiting_status("Estimating", verdict.message, previous=previous,
                                                   generation=generation, now=now()))
            raise Retry(verdict.message, delay=preflight.FETCH_DEADLINE_S + 1)
        if verdict.outcome == "wontfit":
            self._write(ftj, status.refused_status("WontFit", verdict.message, previous=previous,
                                                   generation=generation, now=now()))
            return True
        reason = "Estimated" if verdict.outcome == "fits" else "EstimateSkipped"
        self.kube.event(ftj, "Normal", reason, verdict.message)
        return False

    def _mark_cleaned(self, ftj: Json) -> None:
        """status.cleanupTime: the children are gone; the resync timer stops for this job."""
        meta = ftj["metadata"]
        self.kube.patch_status(meta["namespace"], meta["name"], {"cleanupTime": now()})
        metrics.STATUS_WRITES.labels(source="reconcile").inc()

    def _invalid(self, ftj: Json, job_name: str, message: str, previous: Json, generation: int,
                 applied: Json | None = None) -> None:
        """The spec does not validate. Before any Job exists: Failed (InvalidSpec). A Job created
        when the spec was valid (an upgrade tightened the rules) keeps being tracked to its end."""
        meta = ftj["metadata"]
        job = self.children.get_job(meta["namespace"], job_name)
        if job is None or not owned_by(job, meta["uid"]):
            new = status.invalid_spec_status(message, previous=previous, generation=generation, now=now())
            self._write(ftj, {**new, "preset": applied} if applied else new)
            return
        log.warning("%s/%s: the spec no longer validates (%s); following its running Job to the end",
                    meta["namespace"], meta["name"], message)
        raw = ftj.get("spec") or {}
        pods = self.children.list_pods(meta["namespace"], job)
        observed = status.observe(job, pods, suspend=bool(raw.get("suspend")),
                                  queued=bool((raw.get("scheduling") or {}).get("queueName")))
        self._write(ftj, status.build_status(observed, previous=previous,
                                             generation=int(previous.get("observedGeneration") or generation),
                                             job_name=job_name, now=now()))

    def _wait_for_name(self, ftj: Json, what: str, previous: Json, generation: int) -> NoReturn:
        """A child's name is taken by an object this FineTuneJob does not own: wait, and say so."""
        message = (f"{what} exists and belongs to another owner (a deleted FineTuneJob of the same name "
                   "is still being cleaned up, or a name conflict); the job starts once it is gone")
        self._write(ftj, status.waiting_status("NameConflict", message, previous=previous,
                                               generation=generation, now=now()))
        raise Retry(message, delay=3)

    def _expire(self, ftj: Json, spec: FineTuneJobSpec, previous: Json) -> bool:
        """ttlSecondsAfterFinished: remove the children once the final status is written.

        The operator does this itself rather than through the Job's own TTL, which could delete
        the Job before its outcome is recorded. Returns True when the children were removed.
        """
        ttl, finished = spec.ttl_seconds_after_finished, previous.get("completionTime")
        if ttl is None or not finished:
            return False
        if previous.get("cleanupTime"):
            return True  # removed already; a watch cache may still show the Job for a moment
        left = ttl - seconds_since(finished)
        if left > 0:
            raise Retry(f"children are removed in {left:.0f}s (ttlSecondsAfterFinished)", delay=left)
        meta = ftj["metadata"]
        self.kube.delete_children(meta["namespace"], meta["name"], meta["uid"])
        self._mark_cleaned(ftj)
        self.kube.event(ftj, "Normal", "Cleaned", f"removed the Job and its pods {ttl}s after the end")
        return True

    def _sync_suspend(self, job: Json, spec: FineTuneJobSpec) -> Json:
        """spec.suspend → Job.spec.suspend. A Job in a Kueue queue is left alone: Kueue alone
        flips its suspend, and spec.suspend acts on its Workload (`_sync_workload`)."""
        if status.finished(job) or kueue.queued(job):
            return job
        current = bool((job.get("spec") or {}).get("suspend"))
        wanted = bool(spec.suspend)
        if wanted != current:
            meta = job["metadata"]
            self.kube.set_job_suspend(meta["namespace"], meta["name"], wanted)
            job = {**job, "spec": {**job["spec"], "suspend": wanted}}
        return job

    def _sync_workload(self, job: Json, spec: FineTuneJobSpec) -> Json | None:
        """spec.suspend → the Kueue Workload's spec.active, for a Job in a Kueue queue. Returns the
        Workload when the Job waits for Kueue or is being suspended (its conditions say why), else
        None: an admitted, running Job needs no read."""
        if not kueue.queued(job) or status.finished(job):
            return None
        if not spec.suspend and not (job.get("spec") or {}).get("suspend"):
            return None
        meta = job["metadata"]
        workload = self.kube.get_workload(meta["namespace"], meta["uid"])
        if workload is None:
            return None
        patch = kueue.active_patch(workload, suspend=spec.suspend)
        if patch is not None:
            self.kube.patch_workload(meta["namespace"], workload["metadata"]["name"], patch)
            workload = kueue.merged(workload, patch)
            log.info("%s/%s: Kueue Workload %s %s", meta["namespace"], meta["name"], workload["metadata"]["name"],
                     "re-activated" if kueue.active(workload) else "deactivated")
        return workload
