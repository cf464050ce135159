"""One level-based reconcile pass of a FineTuneJob: observe, plan (kubetune.plan), act.

Called by every handler (create, resume, spec update, child Job/Pod events, periodic resync), so
the result never depends on which event arrived or whether the operator restarted in between:
children have deterministic names (create-or-adopt), and the status is recomputed from the Job
and its Pods.

The decision is the pure `plan.plan(world)`; this module reads what it asks for (`plan.Need`),
then performs its actions in order (`Reconciler._act`). With the operator's watch caches, a pass
plans on the cached FineTuneJob, Job and Pods: an empty plan costs no request, and the FineTuneJob
is read afresh only to create or remove children, or while the cache lags a status it wrote.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from kubetune import metrics, plan, preflight, render, status
from kubetune.kube import Kube, NotOwned, api_message
from kubetune.plan import Plan, World
from kubetune.settings import Settings
from kubetune_contract.config import StorageSpec
from kubetune_contract.events import now

Json = dict[str, Any]
log = logging.getLogger("kubetune.reconcile")


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


class Reconciler:
    """Reconciles FineTuneJobs, one pass at a time per object.

    A call for an object whose reconcile is already running does not wait: it marks the object
    dirty and returns, and the running pass goes round once more (a work queue's dirty set). So no
    thread ever waits on a lock held across a network call.
    """

    def __init__(self, kube: Kube, settings: Settings,
                 on_phase: Callable[[str, str, str, str, Json | None], None] | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.cache: Cache | None = None  # handlers.py sets its watch caches
        # (namespace, name, uid, phase, the status it had): lets the report server track jobs
        self.on_phase = on_phase
        self._guard = threading.Lock()  # guards the two collections below; never held across I/O
        self._running: dict[tuple[str, str], float] = {}  # key → start of the pass (monotonic)
        self._dirty: set[tuple[str, str]] = set()
        self.fetch_config: Callable[[str, StorageSpec, str | None], Json] = preflight.remote_config
        self.estimates = preflight.Estimates()  # GPU memory checks: network reads off the reconcile path
        self.started = now()  # the stall check does not blame runs for what it could not hear before
        self._written: dict[tuple[str, str], tuple[str, Json]] = {}  # key → (uid, the status fields last written)

    @property
    def children(self) -> Children:
        return self.cache if self.cache is not None else self.kube

    def __call__(self, namespace: str, name: str, *, fresh: bool = False) -> None:
        """Reconcile a FineTuneJob. With watch caches and unless `fresh`, first plan on cached
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

    def _once(self, namespace: str, name: str, fresh: bool = False) -> None:
        started = time.monotonic()
        try:
            facts: dict[plan.Fact, Any] = {}
            if not fresh and self._from_cache(namespace, name, facts):
                return
            metrics.RECONCILES.labels(kind="full").inc()
            ftj = self.kube.get_finetunejob(namespace, name)
            if ftj is None or ftj["metadata"].get("deletionTimestamp"):
                return
            self._act(self._plan(ftj, facts), ftj)
        except Retry:
            raise
        except Exception as error:
            metrics.RECONCILE_ERRORS.labels(kind=type(error).__name__).inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    def _from_cache(self, namespace: str, name: str, facts: dict[plan.Fact, Any]) -> bool:
        """A pass on the cached FineTuneJob, as a controller reconciles from its informer's cache;
        True when it is done. False when the FineTuneJob must be read afresh first: the cache lags
        a status this operator wrote (acting on it would tell a transition twice), or the plan
        creates or removes children (done only on a FineTuneJob read afresh). `facts` keeps what was
        read for the fresh pass."""
        cached = self.cache.get_finetunejob(namespace, name) if self.cache is not None else None
        if cached is None or cached["metadata"].get("deletionTimestamp") or self._lags(cached):
            return False
        planned = self._plan(cached, facts)
        if any(isinstance(action, plan.Create | plan.DeleteChildren | plan.DeletePods) for action in planned.actions):
            return False
        metrics.RECONCILES.labels(kind="cached" if not planned.actions else "full").inc()
        self._act(planned, cached)
        return True

    def _lags(self, ftj: Json) -> bool:
        """The FineTuneJob does not show yet the status this operator last wrote for it."""
        meta = ftj["metadata"]
        uid, written = self._written.get((meta["namespace"], meta["name"]), ("", {}))
        shown = ftj.get("status") or {}
        return uid == meta["uid"] and any(shown.get(key) != value for key, value in written.items())

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: drop what was kept about it."""
        self._written.pop((namespace, name), None)

    def _plan(self, ftj: Json, facts: dict[plan.Fact, Any]) -> Plan:
        """Plan, reading each fact the plan asks for (and keeping it in `facts`)."""
        meta = ftj["metadata"]
        job = self.children.get_job(meta["namespace"], render.job_name(meta["name"]))
        while True:
            try:
                return plan.plan(World(ftj, job, now(), self.settings, facts, self.started))
            except plan.Need as need:
                facts[need.fact] = self._read(need.fact, ftj)

    def _read(self, fact: plan.Fact, ftj: Json) -> Any:
        match fact:
            case plan.NamespaceOf(namespace):
                return self.kube.get_namespace(namespace)
            case plan.PresetNamed(kind, namespace, name):
                return self.kube.get_preset(kind, namespace, name)
            case plan.MissingClaims(namespace, claims):
                return self.kube.missing_claims(namespace, list(claims))
            case plan.EstimateOf(uid, generation, spec, storage):
                meta, fetch = ftj["metadata"], self.fetch_config
                return self.estimates.check(
                    (uid, generation), lambda: preflight.check_job(spec, storage, fetch=fetch),
                    on_done=lambda: self.reconcile_soon(meta["namespace"], meta["name"]))
            case plan.WorkloadOf(namespace, job_uid):
                return self.kube.get_workload(namespace, job_uid)
            case plan.PodsOf(_, job):
                return self.children.list_pods(job["metadata"]["namespace"], job)
            case plan.PodRefusal(namespace, job_uid):
                return self.kube.pod_creation_failure(namespace, job_uid)
        raise TypeError(f"no reader for {fact!r}")

    def _observed(self, ftj: Json, planned: Plan) -> None:
        """Tell the metrics and the report server the phase the job is in; log the plan's warning."""
        meta = ftj["metadata"]
        if planned.warning:
            log.warning("%s/%s: %s", meta["namespace"], meta["name"], planned.warning)
        if planned.phase is None:
            return
        metrics.observe_phase(meta["namespace"], meta["name"], planned.phase,
                              (ftj.get("status") or {}).get("reason"))
        progress = (ftj.get("status") or {}).get("progress") or {}
        metrics.running(meta["namespace"], meta["name"], progress.get("step", 0) / progress["totalSteps"]
                        if planned.phase == "Running" and progress.get("totalSteps") else
                        0.0 if planned.phase == "Running" else None)
        if self.on_phase:
            self.on_phase(meta["namespace"], meta["name"], meta["uid"], planned.phase, ftj.get("status"))

    def _act(self, planned: Plan, ftj: Json) -> None:
        """Perform the plan's actions in order; a child the API server refuses, or whose name is
        taken, turns the rest of the plan into the plan for that outcome. Then look again when the
        plan says so (`Retry`: kopf runs the handler again after its delay)."""
        self._observed(ftj, planned)
        meta = ftj["metadata"]
        for action in planned.actions:
            match action:
                case plan.Create(objects, announce):
                    world = World(ftj, None, now(), self.settings)
                    try:
                        created = self._create(objects, meta["uid"])
                    except NotOwned as conflict:
                        return self._act(plan.name_taken(world, conflict.what), ftj)
                    except ApiException as refused:
                        if refused.status not in (400, 403, 422):
                            raise  # the API server is in trouble, not the request: kopf retries
                        return self._act(plan.rejected(world, api_message(refused)), ftj)
                    if created and announce:
                        self.kube.event(ftj, "Normal", "Created", f"created Job {objects[-1]['metadata']['name']}")
                case plan.SetJobSuspend(namespace, name, suspend):
                    self.kube.set_job_suspend(namespace, name, suspend)
                case plan.PatchWorkload(namespace, name, patch):
                    self.kube.patch_workload(namespace, name, patch)
                    log.info("%s/%s: Kueue Workload %s %s", meta["namespace"], meta["name"], name,
                             "deactivated" if patch["spec"]["active"] is False else "re-activated")
                case plan.DeleteChildren(namespace, name, uid):
                    self.kube.delete_children(namespace, name, uid)
                case plan.DeletePods(namespace, job_uid, grace):
                    self.kube.delete_pods(namespace, job_uid, grace)
                case plan.WriteStatus(new):
                    patch = status.as_patch(new)
                    self.kube.patch_status(meta["namespace"], meta["name"], patch)
                    metrics.STATUS_WRITES.labels(source="reconcile").inc()
                    key = (meta["namespace"], meta["name"])
                    uid, before = self._written.get(key, ("", {}))
                    self._written[key] = (meta["uid"], {**(before if uid == meta["uid"] else {}), **patch})
                    if new.phase is not None:
                        log.info("%s/%s: %s (%s) %s", meta["namespace"], meta["name"], new.phase.value,
                                 new.reason, new.message)
                case plan.PostEvent(kind, reason, message):
                    self.kube.event(ftj, kind, reason, message)
                case plan.Account(namespace, preset, queue, outcome, seconds, gpus):
                    metrics.account(namespace, preset, queue, outcome, seconds, gpus)
        if planned.retry:
            raise Retry(*planned.retry)

    def _create(self, objects: tuple[Json, ...], uid: str) -> bool:
        """Create or adopt each child in order; True when the last one (the Job) is new."""
        created = False
        for obj in objects:
            _existing, created = self.kube.create_or_adopt(obj, uid)
        return created

    def stalled(self, limit: float) -> str | None:
        """Why the operator is wedged (a reconcile pass running longer than `limit` seconds), else
        None. Every API call has a timeout, so a healthy pass always ends, even during an outage."""
        now_ = time.monotonic()
        with self._guard:
            oldest = min(self._running.items(), key=lambda item: item[1], default=None)
        if oldest is not None and now_ - oldest[1] > limit:
            (namespace, name), since = oldest
            return f"reconcile of {namespace}/{name} has been running for {now_ - since:.0f}s"
        return None
