"""reports.py: what a trainer report may change, and the per-job rate limit."""

from __future__ import annotations

from kubetune.reports import ProgressReport, TokenBucket, merge, progress_operations, status_patch

NOW = "2026-01-01T00:00:00Z"


def test_report_becomes_progress_and_metrics() -> None:
    report = ProgressReport.model_validate({
        "type": "progress", "step": 30, "totalSteps": 40, "epoch": 1.5, "loss": 0.51234567891,
        "learningRate": 1e-4, "evalLoss": 0.7, "perplexity": 2.0, "tokensPerSecond": 1234.5,
        "etaSeconds": 12.7, "peakMemoryBytes": 10,
    })
    assert status_patch(report, NOW) == {
        "progress": {"step": 30, "totalSteps": 40, "percent": 75, "epoch": 1.5, "etaSeconds": 12, "updatedAt": NOW},
        "metrics": {"trainLoss": 0.512346, "evalLoss": 0.7, "perplexity": 2.0, "learningRate": 0.0001,
                    "tokensPerSecond": 1234.5, "peakMemoryBytes": 10},
    }


def test_a_report_cannot_set_phase_or_anything_else() -> None:
    report = ProgressReport.model_validate({"step": 1, "phase": "Succeeded", "conditions": [],
                                            "artifacts": {"location": "s3://evil/"}})
    patch = status_patch(report, NOW)
    assert set(patch) == {"progress"}
    assert set(patch["progress"]) == {"step", "updatedAt"}


def test_newer_report_keeps_metrics_the_older_one_had() -> None:
    older = {"progress": {"step": 1}, "metrics": {"evalLoss": 0.9, "trainLoss": 1.0}}
    newer = {"progress": {"step": 2}, "metrics": {"trainLoss": 0.8}}
    assert merge(older, newer) == {"progress": {"step": 2}, "metrics": {"evalLoss": 0.9, "trainLoss": 0.8}}


def test_token_bucket_allows_bursts_then_the_rate() -> None:
    clock = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: clock[0])
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    clock[0] = 0.5
    assert [bucket.allow() for _ in range(2)] == [True, False]


def test_progress_write_applies_only_while_running_and_keeps_other_metrics() -> None:
    patch = status_patch(ProgressReport(step=5, total_steps=10, loss=1.5), NOW)
    operations = progress_operations(patch, {"evalLoss": 0.9, "trainLoss": 1.5})
    assert operations[0] == {"op": "test", "path": "/status/phase", "value": "Running"}
    assert {"op": "add", "path": "/status/progress", "value": patch["progress"]} in operations
    # status.metrics is written whole: it need not exist, and the evalLoss of an earlier report stays
    assert {"op": "add", "path": "/status/metrics", "value": {"evalLoss": 0.9, "trainLoss": 1.5}} in operations


def test_a_step_already_shown_updates_metrics_and_the_time_heard_but_not_the_step() -> None:
    """A resumed run reports steps it already passed: the step shown stays, but the stall check's
    clock (updatedAt) and the activity move."""
    patch = status_patch(ProgressReport(step=3, loss=0.5, activity="training"), NOW)
    operations = progress_operations(patch, progress=False)
    assert [op["path"] for op in operations] == ["/status/phase", "/status/progress/updatedAt",
                                                 "/status/progress/activity", "/status/metrics"]
    assert operations[1]["value"] == NOW and operations[2]["value"] == "training"
    assert operations[3]["value"] == {"trainLoss": 0.5}


def test_the_server_keeps_the_status_metrics_beside_reported_ones() -> None:
    from kubetune.reports import ReportServer

    class Kube:
        def __init__(self) -> None:
            self.written: list[list[dict[str, object]]] = []

        def patch_progress(self, namespace: str, name: str, operations: list[dict[str, object]]) -> bool:
            self.written.append(operations)
            return True

    kube = Kube()
    server = ReportServer(kube, key=b"k", interval=1, rate=1, burst=1)  # type: ignore[arg-type]
    # an operator that restarted: the status shows an earlier eval; the next report has only a train loss
    server.observe("ns", "job", "uid", "Running", {"progress": {"step": 4}, "metrics": {"evalLoss": 0.9}})
    server._write_unless_finished(("ns", "job"), status_patch(ProgressReport(step=5, loss=1.5), NOW))
    assert kube.written[-1][-1]["value"] == {"evalLoss": 0.9, "trainLoss": 1.5}
    server._write_unless_finished(("ns", "job"), status_patch(ProgressReport(step=6, eval_loss=0.7), NOW))
    assert kube.written[-1][-1]["value"] == {"evalLoss": 0.7, "trainLoss": 1.5}
    server.observe("ns", "job", "other-uid", "Running", {})  # a new job of the same name
    server._write_unless_finished(("ns", "job"), status_patch(ProgressReport(step=1, loss=2.0), NOW))
    assert kube.written[-1][-1]["value"] == {"trainLoss": 2.0}


def test_status_and_reports_share_the_trainers_event_models() -> None:
    from kubetune import api
    from kubetune_contract import events

    status = api.FineTuneJobStatus.model_fields
    assert status["progress"].annotation == events.Progress | None
    assert status["metrics"].annotation == events.Metrics | None
    assert status["artifacts"].annotation == events.Artifacts | None
    assert ProgressReport is events.ProgressReport


def test_the_data_statistics_of_a_report_go_to_status_dataset_and_survive_a_merge() -> None:
    stats = {"samples": 120, "tokensP50": 9, "truncated": 3, "totalSteps": 30}
    first = status_patch(ProgressReport.model_validate({"step": 0, "totalSteps": 30, "dataset": stats}), "t0")
    assert first["dataset"] == stats
    later = status_patch(ProgressReport.model_validate({"step": 1, "totalSteps": 30, "trainLoss": 2.0}), "t1")
    pending = merge(first, later)
    assert pending["dataset"] == stats and pending["progress"]["step"] == 1
    assert {"op": "add", "path": "/status/dataset", "value": stats} in progress_operations(pending)
    assert not any(op["path"] == "/status/dataset" for op in progress_operations(later))


def test_the_time_to_the_first_step_is_observed_once_per_job() -> None:
    import datetime as dt

    from prometheus_client import REGISTRY

    from kubetune.reports import ReportServer

    class Kube:
        def patch_progress(self, namespace: str, name: str, operations: list[dict[str, object]]) -> bool:
            return True

    def observed() -> float:
        return REGISTRY.get_sample_value("kubetune_time_to_first_step_seconds_count") or 0.0

    server = ReportServer(Kube(), key=b"k", interval=1, rate=1, burst=1)  # type: ignore[arg-type]
    started = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    server.observe("ns", "first", "uid", "Running", {"startTime": started})
    before = observed()
    server._write_unless_finished(("ns", "first"), status_patch(ProgressReport(step=0, eval_loss=3.0), NOW))
    assert observed() == before, "step 0 is the evaluation before training"
    server._write_unless_finished(("ns", "first"), status_patch(ProgressReport(step=1, loss=2.0), NOW))
    server._write_unless_finished(("ns", "first"), status_patch(ProgressReport(step=2, loss=1.9), NOW))
    assert observed() == before + 1
    # An operator that restarts mid-run sees the step in status: no second observation.
    restarted = ReportServer(Kube(), key=b"k", interval=1, rate=1, burst=1)  # type: ignore[arg-type]
    restarted.observe("ns", "first", "uid", "Running", {"startTime": started, "progress": {"step": 2}})
    restarted._write_unless_finished(("ns", "first"), status_patch(ProgressReport(step=3, loss=1.8), NOW))
    assert observed() == before + 1
