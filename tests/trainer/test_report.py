"""Progress reports: stdout always, pushes best effort with a bearer token, summary within 4 KiB."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.report import SUMMARY_MAX_BYTES, Reporter, encode_summary, write_termination_message

pytestmark = pytest.mark.trainer


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """A local HTTP endpoint recording (Authorization header, JSON body) of each POST."""
    received: list[tuple[str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers.get("Authorization", ""), json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/report", received
    server.shutdown()
    server.server_close()


def test_events_go_to_stdout_metrics_and_the_report_url(
    receiver: tuple[str, list[tuple[str, dict[str, Any]]]], tmp_path: Path
) -> None:
    url, received = receiver
    out = io.StringIO()
    reporter = Reporter(tmp_path / "metrics.jsonl", url=url, token="s3cr3t", stream=out)
    for step in range(3):
        reporter.emit({"type": "progress", "step": step, "loss": 1.0 / (step + 1)})
    reporter.close()
    assert [json.loads(line)["step"] for line in out.getvalue().splitlines()] == [0, 1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # Events that queue up while a push is in flight are coalesced: the newest always arrives.
    steps = [body["step"] for _, body in received]
    assert steps[-1] == 2 and steps == sorted(steps)
    assert {auth for auth, _ in received} == {"Bearer s3cr3t"}


def test_a_backlog_is_sent_as_its_newest_event_with_the_latest_eval(tmp_path: Path) -> None:
    received: list[dict[str, Any]] = []
    first_arrived, release = threading.Event(), threading.Event()

    class SlowHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            first_arrived.set()
            release.wait(30)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reporter = Reporter(url=f"http://127.0.0.1:{server.server_port}/", stream=io.StringIO())
        reporter.emit({"type": "progress", "step": 0, "evalLoss": 4.0})
        assert first_arrived.wait(30)
        for step in range(1, 50):  # queued while step 0 is in flight
            reporter.emit({"type": "progress", "step": step, "evalLoss": 3.0 if step == 10 else None})
        reporter.emit({"type": "checkpoint", "step": 49})
        release.set()
        reporter.close(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert [(e["type"], e["step"], e.get("evalLoss")) for e in received] == [
        ("progress", 0, 4.0), ("progress", 49, 3.0), ("checkpoint", 49, None)]


def test_rate_limited_pushes_back_off_without_blocking(tmp_path: Path) -> None:
    answers = [429, 204]
    received: list[int] = []

    class LimitedHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["step"])
            self.send_response(answers.pop(0) if answers else 204)
            self.send_header("Retry-After", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), LimitedHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reporter = Reporter(url=f"http://127.0.0.1:{server.server_port}/", stream=io.StringIO())
        reporter.emit({"type": "progress", "step": 1})
        reporter.emit({"type": "progress", "step": 2})
        reporter.close(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert received[-1] == 2 and reporter.failed == 1 and reporter.sent == len(received) - 1


def test_an_unreachable_operator_never_blocks_training(tmp_path: Path) -> None:
    # A port nothing listens on: every push fails, emit() must still return at once.
    reporter = Reporter(tmp_path / "metrics.jsonl", url="http://127.0.0.1:9/report", stream=io.StringIO())
    started = time.monotonic()
    for step in range(500):
        reporter.emit({"type": "progress", "step": step})
    assert time.monotonic() - started < 5
    reporter.close(timeout=1)
    assert reporter.sent == 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 500


def test_summary_fits_in_a_termination_message() -> None:
    summary = {"error": "x" * 10_000, "exitCode": 1, "step": 3, "totalSteps": 10}
    encoded = encode_summary(summary)
    assert len(encoded.encode()) <= SUMMARY_MAX_BYTES
    decoded = json.loads(encoded)
    assert decoded["exitCode"] == 1 and decoded["step"] == 3 and decoded["error"].startswith("xxx")
    small = {"step": 1, "metrics": {"trainLoss": 0.5}, "artifacts": {"location": "s3://b/r", "files": 3}}
    assert json.loads(encode_summary(small)) == small


def test_non_finite_values_become_null() -> None:
    out = io.StringIO()
    Reporter(stream=out, url="").emit({"step": 1, "loss": float("nan"), "evalLoss": float("inf")}, record=False)
    assert json.loads(out.getvalue()) == {"step": 1, "loss": None, "evalLoss": None}
    assert json.loads(encode_summary({"metrics": {"trainLoss": float("nan")}})) == {"metrics": {"trainLoss": None}}


def test_termination_message_goes_to_the_configured_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    write_termination_message({"step": 5, "totalSteps": 5})
    assert json.loads((tmp_path / "termination-log").read_text()) == {"step": 5, "totalSteps": 5}


def test_a_coalesced_backlog_keeps_the_data_statistics_of_the_first_report() -> None:
    from kubetune_trainer.report import coalesce

    stats = {"samples": 120, "truncated": 3}
    backlog = [{"type": "progress", "step": 0, "dataset": stats, "evalLoss": 6.1, "perplexity": 445.9},
               {"type": "progress", "step": 1, "trainLoss": 5.0},
               {"type": "checkpoint", "step": 1, "location": "x"},
               {"type": "progress", "step": 2, "trainLoss": 4.0}]
    sent = coalesce(backlog)
    assert [e["type"] for e in sent] == ["checkpoint", "progress"]
    assert sent[1]["step"] == 2 and sent[1]["dataset"] == stats and sent[1]["evalLoss"] == 6.1


def test_an_oversized_summary_drops_the_unavailable_reasons_before_the_values() -> None:
    metric = {"tuned": 0.5, "base": 0.25, "delta": 0.25, "samples": 64, "unavailable": "r" * 200}
    summary = {"step": 10, "totalSteps": 10, "artifacts": {"location": "s3://b/" + "p" * 3000, "files": 9},
               "evaluation": {"metrics": {m: dict(metric) for m in ("bleu", "rouge", "exactMatch", "judge")},
                              "headline": "bleu 0.5 (base 0.25)"}}
    encoded = encode_summary(summary)
    assert len(encoded.encode()) <= SUMMARY_MAX_BYTES
    decoded = json.loads(encoded)
    assert decoded["truncated"] is True and decoded["artifacts"]["location"] == summary["artifacts"]["location"]
    assert decoded["evaluation"]["metrics"]["bleu"] == {"tuned": 0.5, "base": 0.25, "delta": 0.25, "samples": 64}
