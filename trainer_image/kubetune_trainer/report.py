"""Progress reporting: JSON lines on stdout, best-effort pushes to the operator, final summary.

Every progress event is one JSON object (camelCase keys) printed as a line on stdout and appended
to ``metrics.jsonl``. When ``KUBETUNE_REPORT_URL`` is set, the same JSON is POSTed there with
``Authorization: Bearer $KUBETUNE_REPORT_TOKEN`` from a background thread: a bounded queue that
drops the oldest event when full, short timeouts, errors logged and ignored; a backlog of progress
events is sent as its newest event, and a 429/503 answer pauses pushing for its Retry-After (at
most 10 s). Training never waits for, or fails because of, the operator.

The final summary (at most 4 KiB) goes to the termination-message file: ``KUBETUNE_TERMINATION_LOG``,
else ``/dev/termination-log`` when writable, else nowhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

TERMINATION_LOG_DEFAULT = "/dev/termination-log"
SUMMARY_MAX_BYTES = 4096
"""Kubernetes keeps at most 4096 bytes of a termination message."""
QUEUE_SIZE = 64
POST_TIMEOUT_S = 3.0
MAX_BACKOFF_S = 10.0


class Reporter:
    """Emits progress events; call :meth:`close` at the end to flush pushes (bounded wait)."""

    def __init__(
        self,
        metrics_path: Path | None = None,
        url: str | None = None,
        token: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.metrics_path = metrics_path
        self.url = url if url is not None else os.environ.get("KUBETUNE_REPORT_URL") or None
        self.token = token if token is not None else os.environ.get("KUBETUNE_REPORT_TOKEN") or None
        self.stream = stream or sys.stdout
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.url:
            self._thread = threading.Thread(target=self._push_loop, name="kubetune-report", daemon=True)
            self._thread.start()

    def emit(self, event: dict[str, Any], *, record: bool = True) -> None:
        """Print ``event`` as a JSON line, append it to metrics.jsonl (``record``), push it."""
        event = finite(event)
        line = json.dumps(event, separators=(",", ":"), default=str)
        with contextlib.suppress(OSError, ValueError):  # stdout closed or a broken pipe: train on
            print(line, file=self.stream, flush=True)
        if record and self.metrics_path is not None:
            with self.metrics_path.open("a") as fh:
                fh.write(line + "\n")
        if self._thread is not None:
            self._enqueue(event)

    def _enqueue(self, event: dict[str, Any] | None) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                # The newest state matters most: make room by dropping the oldest event.
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def _push_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # take whatever else is waiting: a backlog is coalesced, not replayed
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = None in batch
            for event in coalesce([e for e in batch if e is not None]):
                self._push(event)
            if closing:
                return

    def _push(self, event: dict[str, Any]) -> None:
        try:
            self._post(event)
            self.sent += 1
        except Exception as err:  # never let reporting disturb training
            self.failed += 1
            log.debug("progress report to %s failed: %s", self.url, err)
            if self.failed in (1, 10, 100):
                log.warning("progress report failed (%d so far): %s", self.failed, err)
            if isinstance(err, urllib.error.HTTPError) and err.code in (429, 503):
                # Rate-limited: pause this thread (never training); events meanwhile coalesce.
                retry_after = err.headers.get("Retry-After") if err.headers else None
                try:
                    delay = float(retry_after) if retry_after else 1.0
                except ValueError:
                    delay = 1.0
                self._stop.wait(min(max(delay, 0.1), MAX_BACKOFF_S))

    def _post(self, event: dict[str, Any]) -> None:
        assert self.url is not None
        body = json.dumps(event, separators=(",", ":"), default=str).encode()
        request = urllib.request.Request(self.url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
            response.read()

    def close(self, timeout: float = 5.0) -> None:
        """Let queued pushes go out for at most ``timeout`` seconds, then stop the thread."""
        if self._thread is None:
            return
        self._enqueue(None)
        self._thread.join(timeout)
        self._stop.set()
        self._thread = None


def coalesce(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A backlog of progress events becomes its newest one, carrying the newest eval results and
    data statistics.

    Other events (checkpoint, summary, failed) are kept, in order.
    """
    progress = [e for e in events if e.get("type", "progress") == "progress"]
    if len(progress) <= 1:
        return events
    newest = dict(progress[-1])
    evaluated = [e for e in progress if e.get("evalLoss") is not None]
    if newest.get("evalLoss") is None and evaluated:
        newest["evalLoss"] = evaluated[-1]["evalLoss"]
        newest["perplexity"] = evaluated[-1].get("perplexity")
    described = [e for e in progress if e.get("dataset")]
    if not newest.get("dataset") and described:
        newest["dataset"] = described[-1]["dataset"]
    out = []
    for event in events:
        if event is progress[-1]:
            out.append(newest)
        elif event.get("type", "progress") != "progress":
            out.append(event)
    return out


def finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def termination_log_path() -> Path | None:
    """Where the summary goes: ``KUBETUNE_TERMINATION_LOG``, else /dev/termination-log if writable."""
    configured = os.environ.get("KUBETUNE_TERMINATION_LOG")
    if configured:
        return Path(configured)
    default = Path(TERMINATION_LOG_DEFAULT)
    if default.exists() and os.access(default, os.W_OK):
        return default
    return None


def encode_summary(summary: dict[str, Any], limit: int = SUMMARY_MAX_BYTES) -> str:
    """JSON of ``summary`` within ``limit`` bytes: drop detail first, then shorten the message."""
    text = json.dumps(finite(summary), separators=(",", ":"), default=str)
    if len(text.encode()) <= limit:
        return text
    trimmed = json.loads(text)
    artifacts = trimmed.get("artifacts")
    if isinstance(artifacts, dict):
        for key in ("files", "manifest"):
            artifacts.pop(key, None)
    trimmed["truncated"] = True
    text = json.dumps(trimmed, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text
    lineage = artifacts.get("lineage") if isinstance(artifacts, dict) else None
    if isinstance(lineage, dict):
        # The data files' names are in the spec; their digests stay (manifest.json has it all).
        for entry in lineage.get("data") or []:
            if isinstance(entry, dict):
                entry.pop("uri", None)
        text = json.dumps(trimmed, separators=(",", ":"))
        if len(text.encode()) <= limit:
            return text
    evaluation = trimmed.get("evaluation")
    if isinstance(evaluation, dict):
        # The reasons a metric is unavailable are in evaluation.json; the values stay.
        for result in (evaluation.get("metrics") or {}).values():
            if isinstance(result, dict):
                result.pop("unavailable", None)
        text = json.dumps(trimmed, separators=(",", ":"))
        if len(text.encode()) <= limit:
            return text
    if isinstance(trimmed.get("error"), str):
        excess = len(text.encode()) - limit + 16
        message = trimmed["error"].encode()
        trimmed["error"] = message[: max(0, len(message) - excess)].decode(errors="ignore") + "…"
        text = json.dumps(trimmed, separators=(",", ":"))
        if len(text.encode()) <= limit:
            return text
    minimal = {k: trimmed[k] for k in ("error", "exitCode", "step", "totalSteps") if k in trimmed}
    minimal["truncated"] = True
    if isinstance(minimal.get("error"), str):
        minimal["error"] = minimal["error"][:1000]
    return json.dumps(minimal, separators=(",", ":"))


def write_termination_message(summary: dict[str, Any]) -> None:
    """Write the summary to the termination-message file; never raises."""
    path = termination_log_path()
    if path is None:
        return
    try:
        path.write_text(encode_summary(summary))
    except OSError as err:
        log.warning("cannot write the termination message to %s: %s", path, err)
