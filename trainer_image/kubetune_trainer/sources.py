"""Resolve a model or dataset source to a local path.

Schemes:

- ``s3://bucket/key`` one object; ``s3://bucket/prefix`` every object under the prefix (a model
  directory). Endpoint, region and TLS come from the config's ``storage`` section (or ``S3_ENDPOINT``
  when unset); credentials only from the environment: ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY`` and optionally ``AWS_SESSION_TOKEN``.
- ``file:///path`` and plain paths: used in place.
- ``pvc://claim/path``: ``/mnt/pvc/<claim>/<path>``, where the operator mounts the claim
  (``KUBETUNE_PVC_ROOT`` overrides the root for standalone runs).
- ``hf://org/name`` (a model repository) and ``hf://datasets/org/name/path/in/repo`` (one file of a
  dataset repository), at ``model.revision``; ``HF_TOKEN`` is used when set.

Downloads are cached under ``KUBETUNE_CACHE_DIR`` (default ``~/.cache/kubetune/sources``; the
operator mounts the job's cacheVolume there): s3:// objects under ``s3/<endpoint>/<bucket>/<key>``,
and a cached file is used only when it checks out against the object (see
:func:`cached_copy_problem`). A source that does not exist or cannot be reached raises
:class:`SourceUnavailable` (exit code 4).

Object-store requests (these downloads and every artifact-store operation) that fail with a
connection error, a timeout or a 5xx answer are retried with exponential backoff for
``KUBETUNE_STORE_RETRY_SECONDS`` (default 300), read when a client is opened; see :func:`retrying`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from kubetune_contract.config import PVC_MOUNT_ROOT, StorageSpec
from kubetune_contract.s3 import s3_endpoint, split_s3

from .errors import InvalidInput, SourceUnavailable, TrainerError

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)

__all__ = ["PVC_MOUNT_ROOT", "SourceUnavailable", "cache_dir", "resolve", "retrying", "s3_client", "split_s3",
           "store_retry_seconds"]
DEFAULT_CACHE_DIR = "~/.cache/kubetune/sources"
STORE_RETRY_ENV = "KUBETUNE_STORE_RETRY_SECONDS"
DEFAULT_STORE_RETRY_SECONDS = 300.0
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 15.0
CONNECT_TIMEOUT_S = 10.0
"""Per connection attempt (minio's own default is 5 minutes, longer than the whole retry window)."""
READ_TIMEOUT_S = 120.0
TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                      "XMinioServerNotInitialized"}

T = TypeVar("T")


def store_retry_seconds() -> float:
    """How long object-store requests are retried: ``KUBETUNE_STORE_RETRY_SECONDS`` (default 300)."""
    raw = os.environ.get(STORE_RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_STORE_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"{STORE_RETRY_ENV}={raw!r}: expected a number of seconds, 0 or more")
    return value


def is_transient(err: BaseException) -> bool:
    """A connection error, a timeout or a 5xx answer: the store may answer again."""
    import urllib3.exceptions
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
        return True
    if isinstance(err, ServerError):
        return err.status_code >= 500
    if isinstance(err, S3Error):
        return err.code in TRANSIENT_S3_CODES or err.response.status >= 500
    if isinstance(err, InvalidResponseError):
        return str(err).startswith("non-XML response from server; Response code: 5")
    return False


def retrying(what: str, operation: Callable[[], T], window: float,
             unavailable: Callable[[str], TrainerError] = SourceUnavailable,
             transient: Callable[[BaseException], bool] = is_transient, service: str = "object store") -> T:
    """Run ``operation``, retrying ``transient`` errors (object-store ones by default, `is_transient`)
    with exponential backoff (tenacity) for ``window`` seconds, the last pause cut to what is left;
    then raise ``unavailable(message)``. Other errors propagate at once."""
    import tenacity

    deadline = time.monotonic() + window
    backoff = tenacity.wait_exponential(multiplier=RETRY_FIRST_DELAY_S, max=RETRY_MAX_DELAY_S)

    def reason(err: BaseException | None) -> str:
        return f"{type(err).__name__}: {err}"[:500]

    def pause(state: tenacity.RetryCallState) -> float:
        return min(backoff(state), max(deadline - time.monotonic(), 0.0))

    def warn(state: tenacity.RetryCallState) -> None:
        log.warning("%s: %s unreachable (%s); retrying in %.1fs, %.0fs left", what, service,
                    reason(state.outcome.exception() if state.outcome is not None else None),
                    state.upcoming_sleep, deadline - time.monotonic())

    retryer = tenacity.Retrying(retry=tenacity.retry_if_exception(transient), wait=pause,
                                stop=lambda state: time.monotonic() >= deadline, before_sleep=warn)
    try:
        return retryer(operation)
    except tenacity.RetryError as gave_up:
        last = gave_up.last_attempt.exception()
        raise unavailable(f"{what}: {service} unreachable for {window:g}s ({STORE_RETRY_ENV}): {reason(last)}") \
            from last


def cache_dir() -> Path:
    """The download cache: ``KUBETUNE_CACHE_DIR`` or ``~/.cache/kubetune/sources``."""
    return Path(os.environ.get("KUBETUNE_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def s3_client(storage: StorageSpec) -> Minio:
    """A MinIO/S3 client for the configured endpoint, with credentials from the environment.

    Short connect timeouts and few retries inside the client: :func:`retrying` owns the waiting.
    """
    import certifi
    import urllib3
    from minio import Minio

    endpoint, secure = s3_endpoint(storage)
    return Minio(
        endpoint,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        secure=secure,
        region=storage.region,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        ),
    )


def resolve(uri: str, storage: StorageSpec, revision: str | None = None, *, directory: bool = False) -> Path:
    """Return a local path for ``uri``, downloading it into the cache when it is remote.

    ``directory`` says a whole directory (a model) is wanted rather than one file (a dataset).
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "s3":
        return _resolve_s3(uri, storage)
    if scheme == "hf":
        return _resolve_hf(uri, revision, directory=directory)
    if scheme == "pvc":
        claim_path = uri.split("://", 1)[1].strip("/")
        root = Path(os.environ.get("KUBETUNE_PVC_ROOT") or PVC_MOUNT_ROOT)
        claim = claim_path.split("/", 1)[0]
        return _existing(root / claim_path, uri, within=root / claim)
    if scheme == "file":
        return _existing(Path(urlparse(uri).path), uri)
    return _existing(Path(uri).expanduser(), uri)


# The process's own files: what they hold (the environment with its Secrets, mounted tokens) must
# never be read as data and echoed in an error.
SYSTEM_ROOTS = ("/proc", "/sys", "/dev", "/etc", "/run", "/var/run", "/boot")


def _existing(path: Path, uri: str, within: Path | None = None) -> Path:
    """`path` when it exists and is data: inside `within` (a claim's mount) after following links,
    and never under the system's own directories."""
    real = Path(os.path.realpath(path))
    if within is not None and not real.is_relative_to(os.path.realpath(within)):
        raise InvalidInput(f"{uri}: leaves its claim ({within})")
    if any(real == Path(r) or real.is_relative_to(r) for r in SYSTEM_ROOTS):
        raise InvalidInput(f"{uri}: {real} is a system path, not data")
    if not path.exists():
        raise SourceUnavailable(f"{uri}: {path} does not exist")
    return real  # the checked file itself: a link swapped after the check is not followed again


def _resolve_s3(uri: str, storage: StorageSpec) -> Path:
    from minio.error import S3Error

    bucket, key = split_s3(uri)
    client = s3_client(storage)
    window = store_retry_seconds()
    endpoint, secure = s3_endpoint(storage)
    # Per endpoint: the same bucket and key on two object stores are two different objects.
    root = cache_dir() / "s3" / endpoint_dir(endpoint, secure)
    target = cache_path(root, bucket, key, uri)
    try:
        objects = retrying(f"list {uri}", lambda: _s3_objects(client, bucket, key), window)
        if not objects:
            raise SourceUnavailable(f"{uri}: no object or prefix {key!r} in bucket {bucket!r}")
        single = len(objects) == 1 and objects[0].name == key
        total = sum(o.size for o in objects)
        log.info("downloading %s (%d object(s), %d bytes) to %s", uri, len(objects), total, target)
        for obj in objects:
            local = target if single else cache_path(root, bucket, obj.name, uri)
            record = cache_path(root.with_name(root.name + CACHE_RECORD_SUFFIX), bucket, obj.name, uri)
            why = cached_copy_problem(local, record, obj)
            if why is None:
                log.info("cached: %s (verified)", local)
                continue
            if why != "absent":
                log.warning("cached %s is not used: %s; downloading it again", local, why)
            download(client, bucket, obj, local, record, window)
    except S3Error as err:
        raise SourceUnavailable(f"{uri}: {err.code}: {err.message}") from err
    except SourceUnavailable:
        raise
    except Exception as err:  # urllib3 connection errors and friends
        if _is_connection_error(err):
            raise SourceUnavailable(f"{uri}: object store unreachable: {err}") from err
        raise
    return target


CACHE_RECORD_SUFFIX = ".records"
"""``<cache>/s3/<endpoint>.records/<bucket>/<key>``: what was downloaded (ETag, size, sha256), kept
beside the files rather than among them, so that a model directory holds only the model's files."""


@dataclass(frozen=True)
class S3Object:
    name: str
    size: int
    etag: str


def endpoint_dir(endpoint: str, secure: bool) -> str:
    """A cache directory name for one endpoint: readable, and unique through a hash of its URL."""
    url = f"{'https' if secure else 'http'}://{endpoint}"
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", endpoint)[:64]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def cache_path(root: Path, bucket: str, name: str, uri: str) -> Path:
    """``root/bucket/name``; a bucket or key with ``..``, ``.`` or empty parts, or an absolute key, is
    refused so that nothing is written outside the cache."""
    parts = [bucket, *name.strip("/").split("/")] if name.strip("/") else [bucket]
    if name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"{uri}: object key {name!r} cannot be stored in the download cache "
                           "('..', '.', empty parts or an absolute path)")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidInput(f"{uri}: object key {name!r} leads out of the download cache {root}")
    return path


MD5_ETAG = re.compile(r"[0-9a-f]{32}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, in one pass."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def cached_copy_problem(local: Path, record: Path, obj: S3Object) -> str | None:
    """Why the cached file cannot stand in for ``obj`` ("absent" when there is none), or None.

    An object uploaded in one part has its MD5 as ETag: the file must have that MD5. Otherwise
    (multipart uploads) the file must have the sha256 recorded when it was downloaded, for the
    same ETag and size.
    """
    if not local.exists() and not local.is_symlink():
        return "absent"
    if local.is_symlink() or not local.is_file():
        return "not a regular file"
    size = local.stat().st_size
    if size != obj.size:
        return f"{size} bytes, the object has {obj.size}"
    md5, sha256 = file_digests(local)
    if MD5_ETAG.fullmatch(obj.etag):
        return None if md5 == obj.etag else f"its MD5 {md5} is not the object's ETag {obj.etag}"
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        return "no record of its download"
    if recorded != {"etag": obj.etag, "size": obj.size, "sha256": sha256}:
        return "it does not match the record of its download (changed since, or another object)"
    return None


def download(client: Minio, bucket: str, obj: S3Object, local: Path, record: Path, window: float) -> None:
    """Download one object into the cache and record its ETag, size and sha256."""
    record.unlink(missing_ok=True)
    if local.is_symlink() or local.is_dir():
        raise InvalidInput(f"s3://{bucket}/{obj.name}: the cache path {local} is not a regular file")
    local.parent.mkdir(parents=True, exist_ok=True)
    retrying(f"download s3://{bucket}/{obj.name}",
             lambda: client.fget_object(bucket, obj.name, str(local), progress=DownloadProgress()), window)
    _, sha256 = file_digests(local)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"etag": obj.etag, "size": obj.size, "sha256": sha256}))
    log.info("downloaded s3://%s/%s (%d bytes)", bucket, obj.name, obj.size)


class DownloadProgress:
    """Logs a large download's progress every 30 seconds (minio's progress protocol)."""

    interval_s = 30.0

    def __init__(self) -> None:
        self.name = ""
        self.total = 0
        self.done = 0
        self.last = time.monotonic()

    def set_meta(self, object_name: str, total_length: int) -> None:
        self.name, self.total = object_name, total_length

    def update(self, length: int) -> None:
        self.done += length
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            log.info("downloading %s: %d of %d MiB (%.0f%%)", self.name, self.done >> 20, self.total >> 20,
                     100 * self.done / max(self.total, 1))


def _s3_objects(client: Minio, bucket: str, key: str) -> list[S3Object]:
    """The object ``key`` itself, else every object under ``key/`` (recursively)."""
    from minio.error import S3Error

    if not client.bucket_exists(bucket):
        raise SourceUnavailable(f"s3://{bucket}/{key}: bucket {bucket!r} does not exist")
    if key:
        try:
            stat = client.stat_object(bucket, key)
            return [S3Object(key, int(stat.size or 0), (stat.etag or "").strip('"'))]
        except S3Error as err:
            if err.code not in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                raise
    prefix = f"{key}/" if key else ""
    return [
        S3Object(str(obj.object_name), int(obj.size or 0), (obj.etag or "").strip('"'))
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True)
        if obj.object_name and not obj.is_dir
    ]


def _is_connection_error(err: BaseException) -> bool:
    import urllib3.exceptions

    return isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (checked in seconds, not after the client's retries), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let the client try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"the hub ({host}:{port}) is unreachable: {err}"
    return None


def _resolve_hf(uri: str, revision: str | None, *, directory: bool) -> Path:
    """Download from the hub; without the hub, only what the cache already holds is used."""
    from huggingface_hub import hf_hub_download, snapshot_download

    rest = uri.split("://", 1)[1].strip("/")
    unreachable = _hub_unreachable()
    kwargs: dict[str, Any] = {
        "revision": revision,
        "cache_dir": str(cache_dir() / "hf"),
        "etag_timeout": 10,
        "local_files_only": unreachable is not None,
    }
    if unreachable:
        log.info("%s: %s; looking in the cache %s", uri, unreachable, kwargs["cache_dir"])
    else:
        log.info("downloading %s (revision %s) from the Hugging Face hub", uri, revision or "main")
    try:
        if rest.startswith("datasets/"):
            parts = rest.split("/")
            if len(parts) < 4:
                raise SourceUnavailable(f"{uri}: expected hf://datasets/org/name/path/in/repo")
            repo_id, filename = "/".join(parts[1:3]), "/".join(parts[3:])
            return Path(hf_hub_download(repo_id, filename, repo_type="dataset", **kwargs))
        if not directory:
            parts = rest.split("/")
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
            if filename:
                return Path(hf_hub_download(repo_id, filename, **kwargs))
        return Path(snapshot_download(rest, **kwargs))
    except SourceUnavailable:
        raise
    except Exception as err:
        if unreachable:
            raise SourceUnavailable(
                f"{uri}: {unreachable}, and the cache has no copy; copy the files to s3://, pvc:// or a "
                "local path, or set HF_ENDPOINT to a reachable mirror"
            ) from err
        # Not found, gated, a failed download: none of these heals by retrying inside the pod.
        raise SourceUnavailable(f"{uri}: cannot download from the Hugging Face hub: {err}") from err
