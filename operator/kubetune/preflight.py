"""Will the run fit the GPU? The estimate before a Job is created, and `kubetune estimate`.

The estimate (kubetune_contract.estimate) needs the backbone's config.json and the memory of one
GPU. The operator never reads a Secret, so it reads config.json only where no credentials are
needed: an hf:// backbone from the hub (``HF_ENDPOINT`` or huggingface.co) and an s3:// backbone
from a bucket that allows anonymous reads. Elsewhere (a private bucket, a gated repository, a pvc://
or local path, an unreachable hub) it skips the estimate with an event, and the trainer checks the
real device before loading the weights. The GPU memory comes from ``resources.gpuMemory``, else from
a ``nvidia.com/gpu.memory`` node label (MiB, as GPU feature discovery writes it) that
``scheduling.nodeSelector`` pins.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kubetune import api
from kubetune_contract.config import RunSections, StorageSpec, Strategy, TrainerConfig
from kubetune_contract.estimate import Estimate, ModelConfigError, ModelShape, estimate_run, parse_quantity
from kubetune_contract.s3 import s3_endpoint, split_s3

Json = dict[str, Any]
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
FETCH_DEADLINE_S = 5.0  # a config.json's whole answer (headers and body); each connection attempt too
CONFIG_MAX_BYTES = 1024 * 1024
HF_DEFAULT_ENDPOINT = "https://huggingface.co"


ESTIMATE_WORKERS = 4  # threads that read config.json for the operator's checks


class ConfigUnavailable(Exception):
    """config.json cannot be read without credentials or a download; the estimate is skipped."""


@dataclass
class Verdict:
    outcome: Literal["fits", "wontfit", "skipped", "pending"]
    message: str
    estimate: Estimate | None = None


PENDING = Verdict("pending", "estimating the GPU memory of the run (reading the backbone's config.json)")


def gpu_memory(spec: api.FineTuneJobSpec) -> tuple[int, str] | None:
    """Bytes of one GPU and where that figure comes from, when known."""
    if spec.resources.gpu_memory:
        return parse_quantity(spec.resources.gpu_memory), "resources.gpuMemory"
    label = (spec.scheduling.node_selector or {}).get(GPU_MEMORY_LABEL, "").strip()
    if label.isdigit() and int(label) > 0:
        return int(label) * 1024**2, f"node label {GPU_MEMORY_LABEL}={label} (MiB)"
    return None


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


class _Deadline:
    """Closes a connection's socket once `seconds` have passed, whatever the peer does: a server
    that drips a byte every few seconds cannot hold the caller past the deadline."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self._connection = connection
        self._end = time.monotonic() + seconds
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self.expired = False
        self.sock: socket.socket | None = None  # kept: http.client drops its own once a response is read

    def _expire(self) -> None:
        self.expired = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread

    def left(self) -> float:
        """Seconds left (at least a little, so a socket timeout is never 0: non-blocking)."""
        return max(self._end - time.monotonic(), 0.001)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._connection.close()
        if self.sock is not None:
            self.sock.close()


def http_get_json(url: str, deadline: float = FETCH_DEADLINE_S) -> Json:
    """GET a small JSON document without credentials: each connection attempt and then the whole
    answer (headers and body) within `deadline` seconds, no redirect followed, at most
    CONFIG_MAX_BYTES read."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigUnavailable(f"{url}: not an http(s) URL")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=deadline)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    with _Deadline(connection, deadline) as clock:
        try:
            connection.connect()
            clock.sock = connection.sock
            if clock.expired:  # connecting took the whole deadline: the watchdog had nothing to close
                raise TimeoutError("connect")
            if clock.sock is not None:
                clock.sock.settimeout(clock.left())
            connection.request("GET", target, headers={"User-Agent": "kubetune-operator", "Accept": "application/json"})
            response = connection.getresponse()
            if 300 <= response.status < 400:
                raise ConfigUnavailable(f"{url}: HTTP {response.status} redirect, not followed")
            if response.status != 200:
                raise ConfigUnavailable(f"{url}: HTTP {response.status} (private or missing; no credentials are used)")
            length = response.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > CONFIG_MAX_BYTES:
                raise ConfigUnavailable(f"{url}: {int(length)} bytes, larger than {CONFIG_MAX_BYTES}: "
                                        "not a config.json")
            body = b""
            while len(body) <= CONFIG_MAX_BYTES:
                if clock.sock is not None:
                    clock.sock.settimeout(clock.left())
                chunk = response.read1(CONFIG_MAX_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
        except ConfigUnavailable:
            raise
        except Exception as err:  # once the watchdog shut the socket, http.client may fail in any way
            if clock.expired or isinstance(err, TimeoutError):
                raise ConfigUnavailable(f"{url}: no complete answer within {deadline:g}s") from err
            raise ConfigUnavailable(f"{url}: unreachable: {err}") from err
        if clock.expired:
            raise ConfigUnavailable(f"{url}: no complete answer within {deadline:g}s")
    if len(body) > CONFIG_MAX_BYTES:
        raise ConfigUnavailable(f"{url}: larger than {CONFIG_MAX_BYTES} bytes, not a config.json")
    return json_object(body, url)


def json_object(text: str | bytes, where: object) -> Json:
    """A JSON object parsed from `text`; ConfigUnavailable naming `where` otherwise (deep nesting
    and numbers too long to convert included)."""
    try:
        data = json.loads(text)
    except RecursionError as err:
        raise ConfigUnavailable(f"{where}: not a config.json: nested too deeply") from err
    except ValueError as err:
        raise ConfigUnavailable(f"{where}: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigUnavailable(f"{where}: expected a JSON object")
    return data


def anonymous_url(source: str, storage: StorageSpec, revision: str | None) -> str:
    """Where config.json of an hf:// or s3:// backbone can be read without credentials."""
    scheme, _, rest = source.partition("://") if "://" in source else ("", "", source)
    if scheme == "hf":
        endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
        repo = "/".join(rest.strip("/").split("/")[:2])
        ref = urllib.parse.quote(revision or "main", safe="")
        return f"{endpoint}/{repo}/resolve/{ref}/config.json"
    if scheme == "s3":
        bucket, key = split_s3(source)
        host, secure = s3_endpoint(storage)
        path = urllib.parse.quote(join(f"{bucket}/{key}" if key else bucket, "config.json"))
        return f"{'https' if secure else 'http'}://{host}/{path}"
    raise ConfigUnavailable(f"{source}: the operator cannot read a {scheme or 'local'} source "
                            "(it is mounted in the training pod only)")


def remote_config(source: str, storage: StorageSpec, revision: str | None) -> Json:
    """config.json of a backbone, read without credentials (the operator's way)."""
    return http_get_json(anonymous_url(source, storage, revision))


def local_config(source: str) -> Json | None:
    """config.json of a backbone given as a local directory (plain path or file://), else None."""
    if "://" in source and not source.startswith("file://"):
        return None
    directory = Path(urllib.parse.urlparse(source).path if source.startswith("file://") else source).expanduser()
    path = directory if directory.name == "config.json" else directory / "config.json"
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise ConfigUnavailable(f"{path}: no such file") from err
    return json_object(text, path)


def credentialed_config(source: str, storage: StorageSpec, revision: str | None) -> Json:
    """config.json of an hf:// or s3:// backbone with the caller's credentials (HF_TOKEN, AWS_*),
    downloading only that file (into the trainer's download cache); without the trainer's
    dependencies (minio, huggingface-hub), read anonymously as the operator does."""
    try:
        from kubetune_trainer import sources
    except ImportError as err:  # pragma: no cover - the trainer extras are missing
        raise ConfigUnavailable(f"{source}: {err}") from err
    try:
        path = sources.resolve(join(source, "config.json"), storage, revision)
    except ImportError:
        # Without the trainer's dependencies (minio, huggingface-hub): the operator's anonymous read.
        return remote_config(source, storage, revision)
    except Exception as err:
        raise ConfigUnavailable(f"{source}: {err}") from err
    found = local_config(str(path))
    assert found is not None
    return found


def verdict(run: RunSections, config: Json, memory: int | None, world_size: int, where: str = "") -> Verdict:
    """The estimate of ``run`` against ``memory`` bytes per GPU."""
    try:
        shape = ModelShape.from_config(config)
        got = estimate_run(shape, run, world_size=world_size, strategy=run_strategy(run), gpu_memory=memory)
    except (ModelConfigError, ArithmeticError) as err:
        return Verdict("skipped", f"cannot estimate GPU memory: {err}")
    summary = summarize(got, where)
    if got.fits is False:
        return Verdict("wontfit", summary + "; " + suggestions(run, world_size), got)
    return Verdict("fits", summary, got)


def run_strategy(run: RunSections) -> Strategy:
    """The run's distribution strategy: a FineTuneJob's resources.distribution, a trainer config's
    distribution."""
    if isinstance(run, api.FineTuneJobSpec):
        return run.resources.distribution.strategy
    if isinstance(run, TrainerConfig):
        return run.distribution.strategy
    return "ddp"


def summarize(got: Estimate, where: str = "") -> str:
    gib = 1024**3
    parts = (f"weights {got.weights / gib:.1f}, trained state {got.trainable / gib:.1f}, "
             f"activations {got.activations / gib:.1f}, logits {got.logits / gib:.1f}"
             + (f", int8 workspace {got.quantization_workspace / gib:.1f}" if got.quantization_workspace else "")
             + f", overhead {(got.allocator_overhead + got.runtime_reserve) / gib:.1f}")
    text = f"estimated peak GPU memory {got.required / gib:.1f} GiB per GPU ({parts})"
    if got.gpu_memory is not None:
        text += (f" {'fits' if got.fits else 'does not fit'} in {got.gpu_memory / gib:.1f} GiB"
                 + (f" ({where})" if where else ""))
    return text


def suggestions(run: RunSections, world_size: int) -> str:
    """Settings that lower the peak, for the WontFit and OutOfMemory messages."""
    tc = run.training
    hints = [
        *([f"quantization int4 (now {run.quantization})"] if run.quantization != "int4" and run.lora.enabled else []),
        f"a smaller dataset.maxLength (now {run.dataset.max_length})",
        *([f"a smaller training.batchSize (now {tc.batch_size}; raise training.gradientAccumulation to keep "
           "the global batch), or training.batchSize: auto with training.globalBatchSize"]
          if isinstance(tc.batch_size, int) and tc.batch_size > 1 else []),
        *(["training.gradientCheckpointing: true"] if tc.gradient_checkpointing is False else []),
        "or a GPU with more memory",
    ]
    return "to fit, try " + ", ".join(hints)


class Estimates:
    """The operator's GPU memory checks, run on a few threads of their own so that no reconcile
    waits on a network read: a job's backbone server is the job author's choice, and each read is
    bounded by FETCH_DEADLINE_S. `check` answers at once: the verdict once it is ready, else a
    "pending" verdict while the read runs; `on_done(key)` is called when it finishes, so the job is
    reconciled again without waiting for a timer. A verdict is kept for its key (the operator uses
    the job's UID and generation, so an edit is estimated again) until `forget`."""

    def __init__(self, workers: int = ESTIMATE_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-estimate")
        self._lock = threading.Lock()
        self._work: dict[Hashable, Future[Verdict | None]] = {}

    def check(self, key: Hashable, work: Callable[[], Verdict | None],
              on_done: Callable[[], None] | None = None) -> Verdict | None:
        with self._lock:
            future = self._work.get(key)
            started = future is None
            if future is None:
                future = self._pool.submit(work)
                self._work[key] = future
        if started:
            if on_done is not None:
                future.add_done_callback(lambda _f: on_done())  # outside the lock: it may run at once
            return PENDING
        if not future.done():
            return PENDING
        try:
            return future.result()
        except Exception as err:
            return Verdict("skipped", f"GPU memory not estimated: {type(err).__name__}: {err}")

    def forget(self, job: Hashable) -> None:
        """Drop every verdict kept for a job that is gone (keys are (job, ...) tuples; a running
        read finishes and is dropped)."""
        with self._lock:
            for key in [k for k in self._work if k == job or (isinstance(k, tuple) and k[:1] == (job,))]:
                del self._work[key]

def needs_estimate(spec: api.FineTuneJobSpec) -> bool:
    """Whether the operator checks this job's GPU memory: it uses GPUs of a known size."""
    return spec.resources.gpus >= 1 and gpu_memory(spec) is not None


def check_job(spec: api.FineTuneJobSpec, storage: StorageSpec,
              fetch: Callable[[str, StorageSpec, str | None], Json] = remote_config) -> Verdict | None:
    """The operator's check before creating the Job; None when there is nothing to check
    (no GPUs, or the GPU memory is unknown)."""
    memory = gpu_memory(spec)
    if spec.resources.gpus < 1 or memory is None:
        return None
    try:
        config = fetch(spec.model.source, storage, spec.model.revision)
    except ConfigUnavailable as err:
        return Verdict("skipped", f"GPU memory not estimated: config.json unavailable: {err}; "
                                  "the trainer checks the device before loading the weights")
    # One process per GPU, each with a whole replica (ddp) or a shard (fsdp) of the model.
    return verdict(spec, config, memory[0], world_size=spec.resources.gpus, where=memory[1])


def load_run(path: Path) -> tuple[RunSections, int, int | None]:
    """A FineTuneJob manifest (the first FineTuneJob of a multi-document file) or a trainer config:
    (the run, processes, GPU memory from resources.gpuMemory)."""
    text = path.read_text()
    documents = [d for d in yaml.safe_load_all(text) if d is not None] if path.suffix != ".json" \
        else [json.loads(text)]
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == api.KIND]
    if jobs:
        spec = api.FineTuneJobSpec.model_validate(jobs[0].get("spec") or {}, context={api.LOCAL_SOURCES: True})
        memory = gpu_memory(spec)
        return spec, max(spec.resources.gpus, 1), None if memory is None else memory[0]
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ValueError(f"{path}: expected a FineTuneJob manifest or a trainer config")
    return TrainerConfig.model_validate(documents[0]), 1, None


def data_statistics(run: RunSections, path: Path, processes: int) -> tuple[dict[str, Any], list[str]]:
    """`kubetune estimate --data`: the trainer's statistics of a local data file (as JSON and as
    lines); needs the trainer's dependencies (the tokenizer)."""
    try:
        from kubetune_trainer import data_stats
        from kubetune_trainer.errors import TrainerError
    except ImportError as err:
        raise ValueError(f"--data needs the trainer's dependencies (pip install 'kubetune[trainer]'): {err}") from err
    try:
        stats = data_stats.of_file(run, path, processes)
    except TrainerError as err:
        raise ValueError(str(err)) from err
    return stats.model_dump(by_alias=True, exclude_none=True), data_stats.lines(stats, run.dataset.max_length)
