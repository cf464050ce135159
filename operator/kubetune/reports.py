"""The report endpoint: trainers push progress here; the operator folds it into status.

    POST /v1/reports/<namespace>/<name>   Authorization: Bearer <per-job token>   (JSON, ≤ 16 KiB)
    GET  /metrics                         Prometheus metrics of the operator
    GET  /healthz                         200 while the server runs

Threat model (docs/operations.md): each FineTuneJob gets its own token, an HMAC of its UID under
the operator's report key, delivered to its pod only through a Secret the FineTuneJob owns
(secretKeyRef). A request must name the job in its path and carry that job's token, so a pod can
report only for its own job; checking it needs no API call and no Secret read. Only progress and
metric fields are read from a report; it can never set the phase, conditions, artifacts or
anything else. Requests are size-capped and rate-limited per job, and status is patched at most
once per interval per job however fast reports arrive.

A progress write is a JSON Patch whose first operation tests `status.phase == Running`: the API
server applies it atomically only while the job runs, so a late report can never overwrite the
final status, and no lock is held across the network call.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from kubetune import metrics
from kubetune.api import TERMINAL, Phase
from kubetune.kube import Kube
from kubetune.render import report_token
from kubetune_contract.events import ProgressReport, now, rounded

Json = dict[str, Any]
log = logging.getLogger("kubetune.reports")

MAX_BODY_BYTES = 16 * 1024
SOURCE_RATE, SOURCE_BURST = 5.0, 20.0  # failed or uncached requests per client address
MAX_SOURCES = 4096


def seconds_since(stamp: str) -> float:
    """Seconds from an RFC 3339 timestamp to now."""
    import datetime as dt

    return (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


def status_patch(report: ProgressReport, updated_at: str) -> Json:
    """status.progress and status.metrics from one report (only the fields it carries)."""
    patch: Json = {"progress": report.progress(updated_at).model_dump(by_alias=True, exclude_none=True)}
    reported = rounded(report.metrics().model_dump(by_alias=True, exclude_none=True))
    if reported:
        patch["metrics"] = reported
    if report.dataset is not None:
        patch["dataset"] = report.dataset.model_dump(by_alias=True, exclude_none=True)
    return patch


def progress_operations(patch: Json, metrics: Json | None = None, *, progress: bool = True) -> list[Json]:
    """The JSON Patch of one progress write: applied only while the job is Running.

    `metrics`: every metric known for the job (the status's own, then each report's, `merge`d):
    status.metrics is written whole, so the write needs nothing of the status but its phase, and
    metrics that this report lacks (an earlier evalLoss) are kept. Without `progress`, only
    status.progress.updatedAt and activity are written (a resumed run reporting steps it already
    passed): the step shown never goes back.
    """
    operations: list[Json] = [{"op": "test", "path": "/status/phase", "value": Phase.RUNNING.value}]
    if progress:
        operations.append({"op": "add", "path": "/status/progress", "value": patch["progress"]})
    else:
        # The run is alive (the stall check's clock), whatever step it reports.
        operations += [{"op": "add", "path": f"/status/progress/{key}", "value": patch["progress"][key]}
                       for key in ("updatedAt", "activity") if key in patch["progress"]]
    if patch.get("metrics"):
        operations.append({"op": "add", "path": "/status/metrics", "value": metrics or patch["metrics"]})
    if patch.get("dataset"):
        operations.append({"op": "add", "path": "/status/dataset", "value": patch["dataset"]})
    return operations


def merge(old: Json | None, new: Json) -> Json:
    """Newer report on top of an older pending one (metrics a newer report lacks are kept)."""
    if not old:
        return new
    merged = {"progress": new["progress"], "metrics": {**old.get("metrics", {}), **new.get("metrics", {})}}
    dataset = new.get("dataset") or old.get("dataset")
    return {**merged, "dataset": dataset} if dataset else merged


@dataclass
class TokenBucket:
    """Allows `rate` requests per second with bursts of up to `burst`."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def allow(self) -> bool:
        current = self.clock()
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, current
        self.tokens = min(self.burst, self.tokens + (current - self.stamp) * self.rate)
        self.stamp = current
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


Key = tuple[str, str]


class ReportServer:
    """aiohttp server in the operator process: report intake, status batching, /metrics."""

    def __init__(self, kube: Kube, *, key: bytes, interval: float, rate: float, burst: float) -> None:
        self.kube = kube
        self.key = key  # tokens are render.report_token(key, uid): checked without any API call
        self.interval = interval
        self.rate, self.burst = rate, burst
        # Only jobs the operator reconciles (key → UID) can report: a request for anything else is
        # refused at once, and nothing a request carries ever causes an API call.
        self._known: dict[Key, str] = {}
        self._steps: dict[Key, int] = {}  # the highest progress step in each job's status
        self._started: dict[Key, str] = {}  # each job's status.startTime (the time to its first step)
        self._metrics: dict[Key, Json] = {}  # every metric known for the job: its status's, then reported
        self._buckets: dict[Key, TokenBucket] = {}
        self._sources: dict[str, TokenBucket] = {}
        self._pending: dict[Key, Json] = {}
        self._scheduled: set[Key] = set()
        self._last_flush: dict[Key, float] = {}
        self._finished: set[Key] = set()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/reports/{namespace}/{name}", self.handle_report)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_health)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        log.info("report endpoint and /metrics listening on %s:%d", host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def observe(self, namespace: str, name: str, uid: str, phase: str, status: Json | None = None) -> None:
        """The reconciler saw the job (this UID) in this phase, with `status` as its status was:
        the job is known; a finished job's reports are dropped (pending ones too), a running one's
        accepted. Progress never goes below the status's step, and the status's metrics are kept
        beside reported ones."""
        key = (namespace, name)
        if self._known.get(key) != uid:
            self._steps.pop(key, None)
            self._metrics.pop(key, None)
        self._known[key] = uid
        shown = status or {}
        if shown.get("startTime"):
            self._started[key] = str(shown["startTime"])
        step = (shown.get("progress") or {}).get("step")
        if step is not None:
            self._steps[key] = max(step, self._steps.get(key, 0))
        self._metrics[key] = {**(shown.get("metrics") or {}), **self._metrics.get(key, {})}
        if phase in TERMINAL:
            self._finished.add(key)
            self._pending.pop(key, None)
        elif phase == Phase.RUNNING:
            self._finished.discard(key)

    def forget(self, namespace: str, name: str) -> None:
        """The job was deleted: drop every per-job entry (a job re-created under the name has a new
        UID, hence a new token)."""
        key = (namespace, name)
        for table in (self._known, self._steps, self._metrics, self._buckets, self._pending, self._last_flush,
                      self._started):
            table.pop(key, None)
        for keys in (self._finished, self._scheduled):
            keys.discard(key)

    def _source_allows(self, source: str) -> bool:
        if len(self._sources) > MAX_SOURCES:
            self._sources.clear()
        return self._sources.setdefault(source, TokenBucket(SOURCE_RATE, SOURCE_BURST)).allow()

    def _reject(self, status: int, reason: str, message: str, retry_after: int | None = None) -> web.Response:
        metrics.REPORTS.labels(result=reason).inc()
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return web.json_response({"error": message}, status=status, headers=headers)

    async def handle_report(self, request: web.Request) -> web.Response:
        key: Key = (request.match_info["namespace"], request.match_info["name"])
        header = request.headers.get("Authorization", "")
        presented = header[7:] if header.startswith("Bearer ") else ""
        uid = self._known.get(key)
        if uid is None:
            # No such job here. A flood of these from one address is answered 429; requests for
            # real jobs are never limited by their address (pods may share one).
            if not self._source_allows(request.remote or "unknown"):
                return self._reject(429, "rate_limited", "too many requests for unknown jobs", retry_after=1)
            return self._reject(403 if presented else 401, "forbidden" if presented else "unauthenticated",
                                f"no report token is valid for {key[0]}/{key[1]}")
        if not presented:
            return self._reject(401, "unauthenticated", "missing bearer token")
        if not hmac.compare_digest(presented.encode(), report_token(self.key, uid).encode()):
            return self._reject(403, "forbidden", f"token is not valid for {key[0]}/{key[1]}")
        bucket = self._buckets.setdefault(key, TokenBucket(self.rate, self.burst))
        if not bucket.allow():
            return self._reject(429, "rate_limited", "too many reports; slow down", retry_after=1)
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, "too_large", f"report larger than {MAX_BODY_BYTES} bytes")
        except ValueError:
            return self._reject(400, "invalid", "body is not JSON")
        if not isinstance(body, dict) or body.get("type", "progress") not in ("progress", "activity"):
            metrics.REPORTS.labels(result="ignored").inc()
            return web.json_response({"accepted": False}, status=202)
        try:
            report = ProgressReport.model_validate(body)
        except ValidationError as error:
            return self._reject(400, "invalid", error.errors()[0]["msg"])
        if key in self._finished:
            metrics.REPORTS.labels(result="ignored").inc()
            return web.json_response({"accepted": False}, status=202)
        metrics.REPORTS.labels(result="accepted").inc()
        if report.sent_at is not None:
            metrics.REPORT_LAG.observe(max(0.0, time.time() - report.sent_at))
        self._accept(key, status_patch(report, now()))
        return web.json_response({"accepted": True}, status=202)

    def _accept(self, key: Key, patch: Json) -> None:
        self._pending[key] = merge(self._pending.get(key), patch)
        if key in self._scheduled:
            return
        self._scheduled.add(key)
        delay = max(0.0, self._last_flush.get(key, 0.0) + self.interval - time.monotonic())
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: loop.create_task(self._flush(key)))

    async def _flush(self, key: Key) -> None:
        self._scheduled.discard(key)
        patch = self._pending.pop(key, None)
        if not patch:
            return
        self._last_flush[key] = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write_unless_finished, key, patch)
        except Exception as error:  # a lost progress update heals with the next report
            log.warning("could not write progress of %s/%s: %s", *key, error)

    def _write_unless_finished(self, key: Key, patch: Json) -> None:
        if key in self._finished:
            return
        step = int(patch["progress"]["step"])
        forward = step >= self._steps.get(key, 0)  # after a resume, steps already shown come again
        known = {**self._metrics.get(key, {}), **(patch.get("metrics") or {})}
        operations = progress_operations(patch, known, progress=forward)
        if len(operations) == 1:
            return  # nothing to write: no PATCH
        if self.kube.patch_progress(*key, operations):
            metrics.STATUS_WRITES.labels(source="report").inc()
            self._metrics[key] = known
            if forward:
                if step >= 1 and not self._steps.get(key) and key in self._started:
                    metrics.FIRST_STEP.observe(max(0.0, seconds_since(self._started[key])))
                self._steps[key] = step
        else:
            metrics.REPORTS.labels(result="not_running").inc()

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")
