"""`kubetune watch` and `kubetune describe` on a sequence of FineTuneJob states: a live bar in a real
pseudo-terminal, plain lines in a pipe, the exit code of the end (the API server's watch itself:
tests/e2e/test_quickstart.py)."""

from __future__ import annotations

import io
import os
import pty
import re
from typing import Any

from kubetune import follow

Json = dict[str, Any]


def state(phase: str, reason: str = "", step: int | None = None, **status: Any) -> Json:
    progress = {"step": step, "totalSteps": 300, "etaSeconds": 90} if step is not None else None
    return {"metadata": {"name": "q", "namespace": "ns", "uid": "u"},
            "status": {"phase": phase, "reason": reason, **({"progress": progress} if progress else {}),
                       **status}}


RUN = [
    state("Pending", "Starting", message="waiting for the training pod"),
    state("Running", "Training", 10, metrics={"trainLoss": 2.5, "tokensPerSecond": 812.4}),
    state("Running", "Training", 10, metrics={"trainLoss": 2.5, "tokensPerSecond": 812.4}),
    state("Running", "Training", 150, metrics={"trainLoss": 1.25, "evalLoss": 1.5}),
    state("Succeeded", "Succeeded", 300, metrics={"trainLoss": 0.5, "evalLoss": 0.75},
          artifacts={"location": "s3://runs/ns/q/abcd", "ociReference": "reg/x@sha256:" + "e" * 64},
          evaluation={"headline": "perplexity 2.1 (base 9.8)"}),
]


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    assert follow.watch_job(iter(RUN), out, tty=False) == 0
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in out.getvalue().splitlines()]
    assert lines == [
        "Pending (Starting): waiting for the training pod",
        "Running (Training)",
        "step 10/300 (3%)  loss 2.5000  tok/s 812  eta 1m30s",
        "step 150/300 (50%)  loss 1.2500  eval 1.5000  eta 1m30s",
        "Succeeded",
        "step 300/300 (100%)  loss 0.5000  eval 0.7500",
        "metrics: trainLoss 0.5, evalLoss 0.75",
        "evaluation: perplexity 2.1 (base 9.8)",
        "artifacts: s3://runs/ns/q/abcd",
        f"oci: reg/x@sha256:{'e' * 64}",
    ], "one line per phase change and per new step; no escape codes"
    assert "\x1b" not in out.getvalue()


def test_a_live_bar_in_a_terminal() -> None:
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w", encoding="utf-8", closefd=True) as terminal:
        assert terminal.isatty()
        code = follow.watch_job(iter(RUN), terminal, tty=True)
        terminal.flush()
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end is closed: everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    shown = b"".join(chunks).decode()
    assert code == 0
    assert "\x1b[" in shown, "the bar redraws itself with escape codes"
    assert "300/300" in shown and "━" in shown
    assert "Succeeded" in shown and f"oci: reg/x@sha256:{'e' * 64}" in shown


def test_the_exit_code_says_how_it_ended() -> None:
    assert follow.watch_job(iter([state("Running", "Training", 5), state("Failed", "InvalidInput")]),
                            io.StringIO(), tty=False) == 1
    assert follow.watch_job(iter([None]), io.StringIO(), tty=False) == 1
    assert follow.watch_job(iter([state("Running", "Training", 5)]), io.StringIO(), tty=False) == 2


def test_describe_shows_conditions_artifacts_and_events() -> None:
    ftj = RUN[-1] | {"spec": {"model": {"source": "hf://Org/Tiny"}}}
    ftj["status"]["conditions"] = [{"type": "Ready", "status": "True", "reason": "Succeeded",
                                    "message": "training finished"}]
    events = [{"type": "Normal", "reason": "Pushed", "message": "pushed the adapter to reg/x@sha256:e",
               "lastTimestamp": "2026-12-08T00:00:00Z", "count": 1}]
    text = follow.describe(ftj, events)
    assert "Backbone:     hf://Org/Tiny" in text and "Phase:        Succeeded\n" in text
    assert re.search(r"Ready\s+True\s+Succeeded\s+training finished", text)
    assert "  ociReference: reg/x@sha256:" in text
    assert re.search(r"2026-12-08T00:00:00Z\s+Normal\s+Pushed\s+pushed the adapter", text)
    assert follow.describe(state("Pending"), []).endswith("Events:\n  <none>")
