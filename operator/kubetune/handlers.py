"""kopf handlers: the only module that speaks kopf. Each handler delegates to the Reconciler.

Nothing is built at import: `run` reads the settings, builds an `Operator` (the reconciler, the
report server, what is remembered per job) and registers its handlers in a registry of their own
(`registry`), so the timers' intervals come from the settings of this start.

Handlers are sync functions (kopf runs them in a thread pool) because the kubernetes client is
synchronous. They return nothing: a return value would land in status.<handler>.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, cast

import aiohttp
import kopf

from kubetune import api, metrics
from kubetune.api import TERMINAL, Phase
from kubetune.kube import Kube, load_config
from kubetune.reconcile import Reconciler, Retry
from kubetune.render import MANAGED_BY, OWNER_ANNOTATION
from kubetune.reports import ReportServer
from kubetune.settings import Settings

ERROR_BACKOFF = 5.0  # seconds before kopf runs a handler again after an unexpected error
WAIT_RETRY_SECONDS = 5.0  # how often a job that waits for something (WAITING_REASONS) is looked at
WAITING_REASONS = ("MissingDependency", "NameConflict", "Estimating")
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
Json = dict[str, Any]
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
CACHED_METADATA = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "creationTimestamp",
                   "deletionTimestamp")
FINETUNEJOB_METADATA = ("name", "namespace", "uid", "generation", "labels", "creationTimestamp", "deletionTimestamp")
KOPF_REQUESTS = 32  # connections for kopf's own requests (finalizers), next to one per watch


def essentials(body: kopf.Body, spec_fields: tuple[str, ...] = ()) -> Json:
    """What a reconcile reads of a Job or Pod (metadata, status, a few spec fields): a cache of
    whole objects (pod templates, managedFields) would cost the operator several times the memory."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    return {"metadata": {key: meta[key] for key in CACHED_METADATA if key in meta},
            "spec": {key: spec[key] for key in spec_fields if key in spec},
            "status": body.get("status") or {}}


async def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Json]:
    """Watch cache of FineTuneJobs (metadata without annotations, spec, status), by (namespace, name)."""
    meta = body.get("metadata") or {}
    return {(namespace, name): {"metadata": {key: meta[key] for key in FINETUNEJOB_METADATA if key in meta},
                                "spec": body.get("spec") or {}, "status": body.get("status") or {}}}


async def training_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Json]:
    """Watch cache of training Jobs, by (namespace, name). kopf fills every index from its initial
    listing before any handler runs, so a reconcile never sees a half-filled cache."""
    return {(namespace, name): essentials(body, ("suspend", "completions"))}


async def training_pods(labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Json]:
    """Watch cache of training Pods, by the UID of their Job."""
    uid = labels.get(JOB_UID_LABEL)
    return {uid: essentials(body)} if uid else {}


class CachedChildren:
    """Reads FineTuneJobs, Jobs and Pods from the indices above instead of the API. The caches lag
    the API by a watch event at most: a Job created a moment ago may not be there yet (creating it
    again answers 409 and adopts it), and every change of a Job or Pod triggers a reconcile once it
    is in the cache (`child_changed`). A reconcile creates children only on a FineTuneJob read
    afresh (see Reconciler._from_cache)."""

    def __init__(self, finetunejobs: kopf.Index[tuple[str, str], Json], jobs: kopf.Index[tuple[str, str], Json],
                 pods: kopf.Index[str, Json]) -> None:
        self.finetunejobs = finetunejobs
        self.jobs = jobs
        self.pods = pods

    def get_finetunejob(self, namespace: str, name: str) -> Json | None:
        found = list(self.finetunejobs.get((namespace, name), ()))
        return found[0] if found else None

    def get_job(self, namespace: str, name: str) -> Json | None:
        # list(...) copies the store's values in one step: kopf updates it on the event loop thread.
        found = list(self.jobs.get((namespace, name), ()))
        return found[0] if found else None

    def list_pods(self, namespace: str, job: Json) -> list[Json]:
        return list(self.pods.get(job["metadata"]["uid"], ()))


def kopf_connections(namespaces: tuple[str, ...]) -> int:
    """A bound on kopf's connections to the API server: its watches (FineTuneJobs, Jobs, Pods and,
    with glob patterns, namespaces: per namespace, or once cluster-wide) plus KOPF_REQUESTS. 0 (no
    bound) with glob patterns, whose namespaces are not known in advance."""
    if any(set(pattern) & set("*?[!") for pattern in namespaces):
        return 0
    return KOPF_REQUESTS + 4 * max(1, len(namespaces))


def needs_resync(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """Active jobs, and finished ones whose children ttlSecondsAfterFinished has yet to remove."""
    if status.get("phase") not in TERMINAL:
        return True
    return spec.get("ttlSecondsAfterFinished") is not None and not status.get("cleanupTime")


def waiting(status: kopf.Status, **_: Any) -> bool:
    """Jobs that wait for something to appear (a PVC, a preset, a name to be freed)."""
    return status.get("phase") == Phase.PENDING and status.get("reason") in WAITING_REASONS


class Operator:
    """The running operator: its settings, the namespaces it watches, and what start-up builds
    (the reconciler, the report server) or a job leaves behind (the generation last reconciled).
    Its methods are the kopf handlers; `registry` registers them."""

    def __init__(self, settings: Settings, namespaces: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.watched = namespaces  # namespaces (or patterns) watched; none: cluster-wide
        self._reconciler: Reconciler | None = None
        self.server: ReportServer | None = None
        self.generations: dict[str, int] = {}  # FineTuneJob UID → the generation last reconciled from an event

    def reconciler(self) -> Reconciler:
        if self._reconciler is None:
            raise kopf.TemporaryError("operator is starting", delay=1)
        return self._reconciler

    async def login(self, logger: Any, settings: kopf.OperatorSettings, **_: Any) -> kopf.AiohttpSession:
        """kopf's own login (the service account in a pod, else the kubeconfig) on a bounded pool of
        connections. kopf's default pool is unbounded: a burst of new FineTuneJobs opens one TLS
        connection per finalizer write, each holding a 256 KiB buffer (hundreds of MiB at 1,000 jobs)."""
        info = kopf.login_via_client(logger=logger, settings=settings)
        if info is None:
            raise kopf.LoginError("no Kubernetes credentials: neither in-cluster nor a kubeconfig")
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=kopf_connections(self.watched), ssl=info.as_ssl_context()),
            headers=info.as_http_headers(), auth=info.as_aiohttp_basic_auth(), trust_env=info.trust_env)
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                                   aiohttp_session=session)

    async def configure(self, settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        """Own prefixes for kopf's bookkeeping, our own Events, API timeouts, the API client, the
        report endpoint, the watch caches."""
        own = self.settings
        settings.persistence.finalizer = "kubetune.io/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="kubetune.io", key="last-handled-configuration"
        )
        settings.posting.enabled = False  # Events are posted by the reconciler, one per transition.
        # Without a server-side timeout a watch can hang silently after network trouble
        # (https://github.com/nolar/kopf/issues/585): reconnect every few minutes.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 30
        # kopf's own requests (finalizers, annotations) are bounded like ours (Kube(timeout=...)).
        settings.networking.request_timeout = own.api_timeout
        settings.networking.connect_timeout = min(5.0, own.api_timeout)
        settings.execution.max_workers = 16
        settings.execution.default_backoff = ERROR_BACKOFF
        load_config()
        kube = Kube(timeout=own.api_timeout)
        reconciling = Reconciler(kube, own)
        reconciling.cache = CachedChildren(kwargs["finetunejobs"], kwargs["training_jobs"], kwargs["training_pods"])
        if own.report_key_generated and own.report_url:
            logging.getLogger("kubetune.reports").warning(
                "neither KUBETUNE_REPORT_KEY_FILE nor KUBETUNE_REPORT_KEY is set: using a random key; after a "
                "restart, running jobs can no longer push progress (their final status still arrives)")
        server = ReportServer(kube, key=own.report_key, interval=own.status_interval,
                              rate=own.report_rate, burst=own.report_burst)
        if own.report_listen:
            host, _sep, port = own.report_listen.rpartition(":")
            await server.start(host or "0.0.0.0", int(port))
            self.server = server
        reconciling.on_phase = server.observe
        self._reconciler = reconciling

    def reconciles_progress(self, **_: Any) -> str:
        """Part of the liveness endpoint: it answers 500 once a reconcile has run longer than
        KUBETUNE_STALL_SECONDS (every API call has a timeout, so only a wedged operator gets there)."""
        problem = self._reconciler.stalled(self.settings.stall_seconds) if self._reconciler is not None else None
        if problem:
            logging.getLogger("kubetune.health").error("liveness check failed: %s", problem)
            raise kopf.PermanentError(problem)
        return "ok"

    async def shutdown(self, **_: Any) -> None:
        if self.server is not None:
            await self.server.stop()

    def reconcile(self, namespace: str | None, name: str, *, retry: bool = True, fresh: bool = False) -> None:
        """Reconcile. A `Retry` becomes kopf's TemporaryError (kopf runs the handler again after its
        delay) when `retry`; event handlers, which kopf does not retry, drop it: the resync timer
        (`finetunejob_resync`) comes back to every job that still needs work. Nothing deferred lives
        in this process only, so an error or a restart loses nothing."""
        if namespace is None:  # FineTuneJobs and their children are namespaced
            return
        try:
            self.reconciler()(namespace, name, fresh=fresh)
        except Retry as wait:
            if retry:
                raise kopf.TemporaryError(str(wait), delay=wait.delay) from None

    def finetunejob_resync(self, namespace: str | None, name: str, **_: Any) -> None:
        """Re-check jobs that need it, reading the FineTuneJob afresh: a safety net for missed events,
        retries of what failed, and the ttlSecondsAfterFinished clean-up (kopf runs the timer again at a
        TemporaryError's delay, and after ERROR_BACKOFF seconds on any other error).

        kopf keeps its finalizer (kubetune.io/finalizer) on a FineTuneJob while its timers run, and
        removes it once the job needs nothing more (`needs_resync`).
        """
        self.reconcile(namespace, name, fresh=True)

    def finetunejob_waiting(self, namespace: str | None, name: str, **_: Any) -> None:
        """Jobs that wait for something are looked at more often than the resync: they start a few
        seconds after what they wait for appears."""
        self.reconcile(namespace, name, fresh=True)

    def finetunejob_event(self, type: str | None, namespace: str | None, name: str, uid: str, meta: kopf.Meta,
                          **_: Any) -> None:
        """FineTuneJobs are reconciled from their watch events: found at start-up (type None), new
        (ADDED: at once, not one round trip later as kopf's on.create would, after its finalizer), or
        with a new generation (a spec edit); status and metadata writes (generation unchanged) are
        not. What such a pass cannot finish, the timers take up. A FineTuneJob that is gone: forget
        everything kept about it, so memory and the jobs-by-phase gauge follow the jobs that exist
        (owner references remove its children)."""
        if type == "DELETED":
            self.generations.pop(uid, None)
            if self._reconciler is not None:
                self._reconciler.estimates.forget(uid)
                if namespace:
                    self._reconciler.forget(namespace, name)
            if namespace:
                metrics.forget(namespace, name)
                if self.server is not None:
                    self.server.forget(namespace, name)
            return
        generation = int(meta.get("generation") or 0)
        if type == "MODIFIED" and self.generations.get(uid) == generation:
            return
        self.reconcile(namespace, name, retry=False, fresh=type == "MODIFIED")
        self.generations[uid] = generation

    def child_changed(self, namespace: str | None, annotations: kopf.Annotations, **_: Any) -> None:
        """A training Job or Pod changed: reconcile the FineTuneJob it belongs to."""
        owner = annotations.get(OWNER_ANNOTATION)
        if owner:
            self.reconcile(namespace, owner, retry=False)


def registry(operator: Operator) -> kopf.OperatorRegistry:
    """The operator's handlers, with the intervals of its settings. Each has the id its function
    name gives it (the index ids are the keyword arguments `configure` receives)."""
    reg = kopf.OperatorRegistry()
    ftj = (api.GROUP, api.VERSION, api.PLURAL)
    kopf.index(*ftj, id="finetunejobs", registry=reg)(finetunejobs)
    kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS, id="training_jobs", registry=reg)(training_jobs)
    kopf.index("", "v1", "pods", labels=CHILD_LABELS, id="training_pods", registry=reg)(training_pods)
    kopf.on.login(id="login", registry=reg)(operator.login)
    kopf.on.startup(id="configure", registry=reg)(operator.configure)
    kopf.on.probe(id="reconciles", registry=reg)(operator.reconciles_progress)
    kopf.on.cleanup(id="shutdown", registry=reg)(operator.shutdown)
    resync = operator.settings.resync_seconds
    kopf.timer(*ftj, id="finetunejob_resync", interval=resync, initial_delay=resync, backoff=ERROR_BACKOFF,
               when=needs_resync, registry=reg)(operator.finetunejob_resync)
    kopf.timer(*ftj, id="finetunejob_waiting", interval=WAIT_RETRY_SECONDS, initial_delay=WAIT_RETRY_SECONDS,
               backoff=ERROR_BACKOFF, when=waiting, registry=reg)(operator.finetunejob_waiting)
    kopf.on.event(*ftj, id="finetunejob_event", registry=reg)(operator.finetunejob_event)
    kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS, id="child_changed", registry=reg)(
        operator.child_changed)
    kopf.on.event("", "v1", "pods", labels=CHILD_LABELS, id="child_changed", registry=reg)(
        operator.child_changed)
    return reg


def run(namespaces: list[str]) -> int:
    """Run the operator in the foreground until interrupted (`kubetune operator`)."""
    import asyncio

    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    watched = tuple(namespaces or settings.namespaces)
    operator = Operator(settings, watched)
    asyncio.run(kopf.operator(
        registry=registry(operator),
        standalone=True,
        # kopf would otherwise derive it from the user name, which an arbitrary non-root uid
        # (no /etc/passwd entry, as Kubernetes runs images) does not have: getpwuid() fails.
        identity=cast(Any, f"kubetune@{socket.gethostname()}"),  # kopf's Identity: a NewType of str
        clusterwide=not watched,
        namespaces=watched,
        liveness_endpoint=settings.liveness_endpoint,
    ))
    return 0
