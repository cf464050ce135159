"""The operator's gauges for alerts: stalled jobs by namespace, the longest queue wait, per-job series
only while a job runs."""

from __future__ import annotations

from prometheus_client import REGISTRY

from kubetune import metrics


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_stalled_jobs_are_counted_per_namespace_and_back_to_zero() -> None:
    metrics.observe_phase("alerts", "a", "Running", "NoProgress")
    metrics.observe_phase("alerts", "b", "Running", "Training")
    assert value("kubetune_finetunejobs_stalled", namespace="alerts") == 1
    metrics.observe_phase("alerts", "a", "Pending", "NoProgress")  # its pods are being replaced
    assert value("kubetune_finetunejobs_stalled", namespace="alerts") == 1
    metrics.observe_phase("alerts", "a", "Running", "Training")
    assert value("kubetune_finetunejobs_stalled", namespace="alerts") == 0, "the series stays, at 0"
    metrics.observe_phase("alerts", "a", "Running", "NoProgress")
    metrics.forget("alerts", "a")
    metrics.forget("alerts", "b")
    assert value("kubetune_finetunejobs_stalled", namespace="alerts") == 0


def test_the_longest_queue_wait_grows_while_a_job_waits_and_ends_with_it() -> None:
    metrics.observe_phase("queues", "q", "Queued")
    first = value("kubetune_queued_oldest_seconds")
    metrics.observe_phase("queues", "q", "Queued")
    assert first is not None and (value("kubetune_queued_oldest_seconds") or 0) >= first > 0
    metrics.observe_phase("queues", "q", "Running", "Training")
    assert ("queues", "q") not in metrics._queued_since  # other tests' queued jobs may still count
