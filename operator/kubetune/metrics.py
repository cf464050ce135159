"""Prometheus metrics of the operator (served on /metrics by the report server)."""

from __future__ import annotations

import contextlib
import threading
import time

from prometheus_client import Counter, Gauge, Histogram

from kubetune.api import Phase

FINETUNEJOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs seen by this operator, by phase", ["phase"])
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds", "Time of one reconcile of a FineTuneJob",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILES = Counter("kubetune_reconciles_total", "Reconciles of FineTuneJobs: 'cached' planned nothing to do "
                     "on the watch caches, 'full' acted or read the FineTuneJob afresh", ["kind"])
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised an error", ["kind"])
REPORTS = Counter("kubetune_reports_total", "Progress reports from trainers, by result", ["result"])
API_REQUESTS = Counter("kubetune_api_requests_total", "Kubernetes API requests of the reconciler and the report "
                       "endpoint (kopf's own are not counted), by HTTP method and resource", ["verb", "resource"])
STATUS_WRITES = Counter("kubetune_status_writes_total", "Status patches of FineTuneJobs, by source", ["source"])
# Showback: what the attempts of jobs cost, counted once when each attempt ends. Labels are bounded
# by the cluster's namespaces, presets and queues, never by jobs.
COST_LABELS = ["namespace", "preset", "queue", "outcome"]
GPU_SECONDS = Counter("kubetune_gpu_seconds_total", "GPU-seconds of finished attempts (pod run time x GPUs held), "
                      "by namespace, preset, Kueue queue and outcome: succeeded, failed, preempted (the cost of "
                      "lost work), suspended", COST_LABELS)
RUN_SECONDS = Counter("kubetune_run_seconds_total", "Run time of finished attempts' pods (CPU-only jobs included)",
                      COST_LABELS)
ATTEMPTS = Counter("kubetune_attempts_total", "Finished attempts (training pods) of FineTuneJobs", COST_LABELS)
ATTEMPT_SECONDS = Histogram("kubetune_attempt_duration_seconds", "Run time of one attempt, by outcome", ["outcome"],
                            buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200))
REPORT_LAG = Histogram("kubetune_report_lag_seconds", "From a trainer's progress report to its arrival at the "
                       "operator", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
FIRST_STEP = Histogram("kubetune_time_to_first_step_seconds", "From a Job's start (its status.startTime: admitted, "
                       "not yet scheduled) to the first training step's report: scheduling, image pull, downloads, "
                       "model load and the first evaluation", buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600))
STALLED = Gauge("kubetune_finetunejobs_stalled", "FineTuneJobs whose training stopped advancing (reason "
                "NoProgress, until a new pod runs), by namespace", ["namespace"])
QUEUED_OLDEST = Gauge("kubetune_queued_oldest_seconds", "How long the longest-waiting Queued FineTuneJob has waited "
                      "(since this operator first saw it queued)")
# Per job, only while it runs: removed when it stops running or is deleted.
PROGRESS = Gauge("kubetune_finetunejob_progress_ratio", "Training progress (step / totalSteps) of each running "
                 "FineTuneJob; the series exists only while the job runs", ["namespace", "name"])

_phases: dict[tuple[str, str], str] = {}
_stalled: dict[tuple[str, str], bool] = {}
_namespaces: set[str] = set()  # every namespace seen keeps its stalled count (0 included)
_queued_since: dict[tuple[str, str], float] = {}  # monotonic
_lock = threading.Lock()


def _publish() -> None:
    counts: dict[str, int] = dict.fromkeys(Phase, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        FINETUNEJOBS.labels(phase=phase).set(count)
    stalled = dict.fromkeys(_namespaces, 0)
    for (namespace, _), flag in _stalled.items():
        stalled[namespace] += flag
    for namespace, count in stalled.items():
        STALLED.labels(namespace=namespace).set(count)


def _oldest_queued() -> float:
    with _lock:
        return max((time.monotonic() - since for since in _queued_since.values()), default=0.0)


QUEUED_OLDEST.set_function(_oldest_queued)


def observe_phase(namespace: str, name: str, phase: str, reason: str | None = None) -> None:
    """Record the current phase (and reason) of a FineTuneJob."""
    key = (namespace, name)
    with _lock:
        _phases[key] = phase
        _namespaces.add(namespace)
        _stalled[key] = reason == "NoProgress"  # Running, or Pending while its pods are replaced
        if phase == Phase.QUEUED:
            _queued_since.setdefault(key, time.monotonic())
        else:
            _queued_since.pop(key, None)
        _publish()


def forget(namespace: str, name: str) -> None:
    """A FineTuneJob was deleted."""
    with _lock:
        _phases.pop((namespace, name), None)
        _stalled.pop((namespace, name), None)
        _queued_since.pop((namespace, name), None)
        _publish()
    running(namespace, name, None)


def account(namespace: str, preset: str, queue: str, outcome: str, seconds: float, gpus: int) -> None:
    """One attempt ended: its run time, and its GPU-seconds."""
    labels = {"namespace": namespace, "preset": preset, "queue": queue, "outcome": outcome}
    ATTEMPTS.labels(**labels).inc()
    RUN_SECONDS.labels(**labels).inc(seconds)
    GPU_SECONDS.labels(**labels).inc(seconds * gpus)
    ATTEMPT_SECONDS.labels(outcome=outcome).observe(seconds)


def running(namespace: str, name: str, progress: float | None) -> None:
    """A job's per-job series: set while it runs (progress), removed when it does not (None)."""
    if progress is not None:
        PROGRESS.labels(namespace=namespace, name=name).set(progress)
        return
    with contextlib.suppress(KeyError):  # it was not running
        PROGRESS.remove(namespace, name)
