"""Prometheus metrics of the operator (served on /metrics by the report server)."""

from __future__ import annotations

import threading

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

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def _publish() -> None:
    counts: dict[str, int] = dict.fromkeys(Phase, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        FINETUNEJOBS.labels(phase=phase).set(count)


def observe_phase(namespace: str, name: str, phase: str) -> None:
    """Record the current phase of a FineTuneJob."""
    with _lock:
        _phases[(namespace, name)] = phase
        _publish()


def forget(namespace: str, name: str) -> None:
    """A FineTuneJob was deleted."""
    with _lock:
        _phases.pop((namespace, name), None)
        _publish()
