"""The artifact store (an S3 prefix or a local directory) and the run's published outputs.

Layout under ``<output.location>/<runName>/``::

    adapter/            adapter_model.safetensors, adapter_config.json, tokenizer files
    model/              full fine-tune (lora.enabled=false): the trained model + tokenizer
    merged/             backbone with the adapter merged in (output.mergeAdapter)
    trainer_config.json the run's config (never holds credentials)
    metrics.jsonl       every progress event
    README.md           model card
    loss.png            train and eval loss curves
    evaluation.json     evaluation.metrics, tuned vs base, and the promotion gate's verdict
    predictions.jsonl   per validation prompt: reference, tuned and base answers, per-sample scores
    trainer.log         rank 0's log up to publishing (kubetune logs reads it once the pods are gone)
    checkpoints/step-N/ resumable checkpoints (complete once their checkpoint.json exists)
    manifest.json       written LAST: every published file with its size and sha256, and the lineage

A reader that finds no ``manifest.json`` must treat the run as incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from kubetune_contract.config import StorageSpec

from .errors import SourceUnavailable, StoreUnavailable, TrainerError
from .lineage import card_lines
from .sources import sha256_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

T = TypeVar("T")


class UnsafeKey(ValueError):
    """A key that is not a relative path inside the run (absolute, ``..``, empty parts)."""


def check_key(key: object) -> str:
    """Return ``key`` if it is a relative ``/``-separated path that stays under the run's root."""
    if not isinstance(key, str) or not key:
        raise UnsafeKey(f"{key!r} is not a path")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise UnsafeKey(f"{key!r} is not a relative path inside the run (absolute, '..', '.' or empty parts)")
    return key


class Store(Protocol):
    """Keys are ``/``-separated paths relative to the run's root (see :func:`check_key`)."""

    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def get_file(self, key: str, local: Path, progress: Callable[[int], None] | None = None) -> None:
        """Download ``key`` to ``local``; ``progress`` is told the bytes as they arrive."""
        ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is no such object."""
        ...


class LocalStore:
    """A directory; each file appears atomically (written aside, then renamed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # Symbolic links inside the root must not lead out of it either.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise UnsafeKey(f"{key!r} leads out of {self.root}")
        return path

    def put_file(self, local: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)

    def get_file(self, key: str, local: Path, progress: Callable[[int], None] | None = None) -> None:
        source = self._path(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)
        if progress:
            progress(local.stat().st_size)

    def list(self, prefix: str = "") -> list[str]:
        # Same semantics as an S3 listing: every key that starts with the prefix string.
        head, _, _ = prefix.rpartition("/")
        base = self.root / head if head else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith("."))

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop directories that became empty, up to the root.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break


class BytesTold:
    """minio's progress protocol (set_meta, update), telling a callable the bytes that arrive; a
    retried download restarts, so it tells only bytes beyond what it told before."""

    def __init__(self, tell: Callable[[int], None]) -> None:
        self.tell, self.done, self.told = tell, 0, 0

    def set_meta(self, object_name: str, total_length: int) -> None:
        self.done = 0

    def update(self, length: int) -> None:
        self.done += length
        if self.done > self.told:
            self.tell(self.done - self.told)
            self.told = self.done


class S3Store:
    """A prefix in an S3 bucket (MinIO, AWS S3, …).

    Every request is retried through connection errors, timeouts and 5xx answers for
    ``KUBETUNE_STORE_RETRY_SECONDS`` (read here, once per store). When the store stays away, the error
    is :class:`StoreUnavailable` (exit 5) once this process has written to the store (so the endpoint
    and credentials are known to work), else :class:`SourceUnavailable` (exit 4).
    """

    def __init__(self, uri: str, storage: StorageSpec) -> None:
        from .sources import s3_client, split_s3, store_retry_seconds

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(uri)
        self.client = s3_client(storage)
        self.retry_seconds = store_retry_seconds()
        self.written = False
        """Whether a write to the store has succeeded in this process."""

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unavailable(self, message: str) -> TrainerError:
        if self.written:
            return StoreUnavailable(message)
        return SourceUnavailable(f"output.location: {message}")

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        from .sources import retrying

        return retrying(what, operation, self.retry_seconds, self._unavailable)

    def put_file(self, local: Path, key: str) -> None:
        name = self._key(key)
        self._retrying(f"upload {self.uri}/{key}", lambda: self.client.fput_object(self.bucket, name, str(local)))
        self.written = True

    def get_file(self, key: str, local: Path, progress: Callable[[int], None] | None = None) -> None:
        name = self._key(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        told = BytesTold(progress) if progress else None
        self._retrying(f"download {self.uri}/{key}",
                       lambda: self.client.fget_object(self.bucket, name, str(local), progress=told))

    def list(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""

        def names() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=root + prefix, recursive=True)
            return sorted(str(o.object_name)[len(root) :] for o in objects if o.object_name and not o.is_dir)

        return self._retrying(f"list {self.uri}/{prefix}", names)

    def size(self, key: str) -> int | None:
        from minio.error import S3Error

        name = self._key(key)

        def stat() -> int | None:
            try:
                return int(self.client.stat_object(self.bucket, name).size or 0)
            except S3Error as err:
                if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return None
                raise

        return self._retrying(f"stat {self.uri}/{key}", stat)

    def delete(self, key: str) -> None:
        name = self._key(key)
        self._retrying(f"delete {self.uri}/{key}", lambda: self.client.remove_object(self.bucket, name))


def open_store(location: str, run_name: str, storage: StorageSpec) -> Store:
    """The store for one run: ``<location>/<runName>/``."""
    if location.startswith("s3://"):
        from .sources import retrying

        store = S3Store(f"{location.rstrip('/')}/{run_name}", storage)
        try:
            exists = retrying(f"output.location {location}", lambda: store.client.bucket_exists(store.bucket),
                              store.retry_seconds)
        except SourceUnavailable:
            raise
        except Exception as err:
            raise SourceUnavailable(f"output.location {location}: {type(err).__name__}: {err}") from err
        if not exists:
            raise SourceUnavailable(f"output.location {location}: bucket {store.bucket!r} does not exist")
        return store
    root = Path(urlparse(location).path if location.startswith("file://") else location).expanduser()
    return LocalStore(root.absolute() / run_name)


def publish(
    staging: Path,
    store: Store,
    on_upload: Callable[[str], None] | None = None,
    lineage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload every file under ``staging``, then ``manifest.json`` last (with ``lineage``, what made
    the files); return the manifest.

    An old manifest is removed first, so a reader never pairs it with half-replaced files.
    """
    if MANIFEST in store.list(MANIFEST):
        store.delete(MANIFEST)
    files: list[dict[str, Any]] = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file() or p.is_symlink()):
        key = check_key(path.relative_to(staging).as_posix())
        if path.is_symlink():
            raise UnsafeKey(f"{path} is a symbolic link; only regular files are published")
        if key == MANIFEST:
            continue
        files.append({"path": key, "size": path.stat().st_size, "sha256": sha256_of(path)})
        store.put_file(path, key)
        if on_upload:
            on_upload(key)
        log.info("uploaded %s/%s (%d bytes)", store.uri, key, files[-1]["size"])
    # The manifest vouches for every file: confirm that the store holds each one as uploaded.
    for entry in files:
        stored = store.size(entry["path"])
        if stored != entry["size"]:
            found = "no such object" if stored is None else f"{stored} bytes"
            raise TrainerError(
                f"{store.uri}/{entry['path']}: uploaded {entry['size']} bytes but the store has {found}; "
                f"{MANIFEST} not written"
            )
    manifest = {
        "version": 1,
        "location": store.uri,
        "totalBytes": sum(int(f["size"]) for f in files),
        "files": files,
        **({"lineage": lineage} if lineage else {}),
    }
    manifest_path = staging / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    store.put_file(manifest_path, MANIFEST)
    if on_upload:
        on_upload(MANIFEST)
    log.info("published %d files (%d bytes) to %s", len(files), manifest["totalBytes"], store.uri)
    return manifest


class IncompleteRun(Exception):
    """No manifest, or a file that does not match it."""


def check_manifest(location: str, manifest: object) -> None:
    """Check the shape of a manifest and that every entry is a path inside the run; raise IncompleteRun.

    Runs before any listed file is touched: an entry such as ``../x`` or ``/etc/x`` would otherwise
    make the check read, write or delete files outside the run.
    """
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise IncompleteRun(f"{location}: {MANIFEST} has no files list")
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            raise IncompleteRun(f"{location}: {MANIFEST} entry {entry!r} is not an object")
        try:
            check_key(entry.get("path"))
        except UnsafeKey as err:
            raise IncompleteRun(f"{location}: {MANIFEST} entry {entry.get('path')!r} rejected: {err}") from err
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str) or len(
            digest
        ) != 64:
            raise IncompleteRun(f"{location}: {MANIFEST} entry {entry['path']!r} has no valid size and sha256")


def open_run(location: str, storage: StorageSpec | None = None, insecure_registry: bool = False) -> Store:
    """A published run (``<output.location>/<runName>``) to read, or its OCI artifact
    (``oci://registry/repository@sha256:…``, output.oci)."""
    if location.startswith("oci://"):
        from .oci import OciStore, registry_auth

        return OciStore(location.removeprefix("oci://"), insecure_registry, registry_auth())
    if location.startswith("s3://"):
        return S3Store(location, storage or StorageSpec())
    return LocalStore(Path(urlparse(location).path if location.startswith("file://") else location))


def read_manifest(store: Store, work: Path) -> dict[str, Any]:
    """The run's manifest, checked (:func:`check_manifest`); IncompleteRun when there is none."""
    if MANIFEST not in store.list(MANIFEST):
        raise IncompleteRun(f"{store.uri}: no {MANIFEST}; the run is incomplete")
    store.get_file(MANIFEST, work / MANIFEST)
    try:
        manifest: dict[str, Any] = json.loads((work / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IncompleteRun(f"{store.uri}: {MANIFEST} is not JSON: {err}") from err
    check_manifest(store.uri, manifest)
    return manifest


def fetch_verified(store: Store, entry: dict[str, Any], local: Path,
                   progress: Callable[[int], None] | None = None) -> None:
    """Download one manifest entry to ``local`` and check its size and sha256; IncompleteRun (naming
    the file) when it is missing or differs. ``progress`` is told the bytes as they arrive."""
    try:
        store.get_file(entry["path"], local, progress)
    except IncompleteRun:
        raise
    except Exception as err:
        raise IncompleteRun(f"{store.uri}/{entry['path']} is listed but missing: {err}") from err
    size, digest = local.stat().st_size, sha256_of(local)
    if size != entry["size"] or digest != entry["sha256"]:
        raise IncompleteRun(
            f"{store.uri}/{entry['path']} has size {size} sha256 {digest}, "
            f"{MANIFEST} says {entry['size']} {entry['sha256']}"
        )


def verify_manifest(location: str, storage: StorageSpec | None = None) -> dict[str, Any]:
    """Check a published run (``<output.location>/<runName>``): every file's size and sha256.

    Raises :class:`IncompleteRun` when the manifest is missing or a file differs; returns the
    manifest otherwise.
    """
    store = open_run(location, storage)
    with tempfile.TemporaryDirectory(prefix="kubetune-verify-") as tmp:
        work = Path(tmp)
        manifest = read_manifest(store, work)
        for entry in manifest["files"]:
            local = work / "files" / entry["path"]
            fetch_verified(store, entry, local)
            local.unlink()
    return manifest


def pull_run(location: str, target: Path, storage: StorageSpec | None = None, include: tuple[str, ...] = (),
             progress: Callable[[int, int], Callable[[int], None]] | None = None,
             manifest_sha256: str | None = None, insecure_registry: bool = False) -> dict[str, Any]:
    """Download a published run into ``target`` (which must not exist, or be empty): every file of its
    manifest (those ``include`` names, files or directories, when given), each checked against its sha256 in a
    directory beside ``target`` that becomes ``target`` only once all are; nothing is left when one
    differs. ``progress(files, bytes)`` is called once with the totals and returns what to tell of
    the bytes as they arrive. ``manifest_sha256`` pins the run: a manifest.json with another digest
    is refused, so every file is the one published then. An OCI artifact (``oci://…@sha256:…``)
    holds some of the run's files: all of those by default. Returns the manifest."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty; choose another directory")
    store = open_run(location, storage, insecure_registry)
    if not include and location.startswith("oci://"):
        include = tuple(k for k in store.list() if k != MANIFEST)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        manifest = read_manifest(store, staging)
        found = sha256_of(staging / MANIFEST)
        if manifest_sha256 and found != manifest_sha256.removeprefix("sha256:"):
            raise IncompleteRun(f"{store.uri}/{MANIFEST} has sha256 {found}, pinned {manifest_sha256}: "
                                "the run was published again or altered")
        wanted = [e for e in manifest["files"]
                  if not include or any(e["path"] == i or e["path"].startswith(i.rstrip("/") + "/") for i in include)]
        if include and not wanted:
            raise IncompleteRun(f"{location}: no file of {MANIFEST} is under {', '.join(include)}")
        tell = progress(len(wanted), sum(int(e["size"]) for e in wanted)) if progress else None
        for entry in wanted:
            fetch_verified(store, entry, staging / entry["path"], tell)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def plot_losses(events: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["trainLoss"]) for e in events if e.get("trainLoss") is not None]
    evals = [(e["step"], e["evalLoss"]) for e in events if e.get("evalLoss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(config: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any],
               evaluation: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None) -> str:
    """README.md for the outputs: backbone, data, hyperparameters, final metrics, the evaluation
    (tuned vs base, the gate's verdict) and the lineage."""
    training = config.get("training", {})
    lora = config.get("lora", {})
    lines = [
        f"# {config.get('runName', 'run')}",
        "",
        f"Fine-tuned from `{config['model']['source']}`"
        + (f" (revision `{config['model']['revision']}`)" if config["model"].get("revision") else "")
        + " with KubeTune.",
        "",
        "## Data",
        "",
        f"- train: `{config['dataset']['train']}` ({extra.get('trainSamples')} samples)",
        f"- validation: `{config['dataset'].get('validation') or 'held out from train'}` "
        f"({extra.get('validationSamples')} samples)",
        f"- columns: {columns(config)}",
        f"- maxLength {config['dataset']['maxLength']}, maskPrompt {config['dataset']['maskPrompt']}",
        *data_lines(extra.get("dataset") or {}),
        "",
        "## Training",
        "",
        f"- method {training.get('method', 'sft')}"
        + (f" ({', '.join(f'{k} {v}' for k, v in config['preference'].items() if v is not None)})"
           if config.get("preference") else ""),
        f"- quantization: {config.get('quantization')}",
        f"- LoRA: {'r=' + str(lora.get('r')) + ', alpha=' + str(lora.get('alpha')) if lora.get('enabled') else 'off'}",
        f"- steps: {extra.get('totalSteps')}, batch size {training.get('batchSize')}, "
        f"gradient accumulation {training.get('gradientAccumulation')}",
        f"- learning rate {training.get('learningRate')} ({training.get('lrScheduler')}), "
        f"optimizer {training.get('optimizer')}, seed {training.get('seed')}",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat(metrics).items()),
        "",
        *evaluation_table(evaluation or {}),
        *card_lines(lineage or {}),
        "Full configuration: `trainer_config.json`; per-step metrics: `metrics.jsonl`; curves: `loss.png`.",
        "",
    ]
    return "\n".join(lines)


def columns(config: dict[str, Any]) -> str:
    """The data columns a run reads, for the model card."""
    dataset, method = config["dataset"], config.get("training", {}).get("method", "sft")
    if method != "sft":
        return (f"prompt `{dataset['promptColumn']}`, chosen `{dataset['chosenColumn']}`, "
                f"rejected `{dataset['rejectedColumn']}`")
    if dataset.get("messagesColumn"):
        return f"messages `{dataset['messagesColumn']}`"
    return f"prompt `{dataset['promptColumn']}`, answer `{dataset['answerColumn']}`"


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as dotted names (evalRewards.accuracy)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def data_lines(dataset: dict[str, Any]) -> list[str]:
    """The model card's statistics of the training data (status.dataset)."""
    if not dataset:
        return []
    lines = [
        f"- tokens per sample: p50 {dataset.get('tokensP50')}, p95 {dataset.get('tokensP95')}, "
        f"max {dataset.get('tokensMax')}; {dataset.get('truncated')} truncated, {dataset.get('dropped')} dropped",
        f"- {dataset.get('epochTokens')} tokens per epoch, {dataset.get('stepsPerEpoch')} steps per epoch; "
        f"{dataset.get('totalTokens')} tokens in {dataset.get('totalSteps')} steps",
    ]
    if dataset.get("estimatedSeconds") is not None:
        lines.append(f"- estimated from the first steps: {dataset['estimatedSeconds']}s of training, "
                     f"{dataset.get('gpuHours')} GPU-hours")
    return [*lines, "- rendered samples (template applied, loss-free part marked): `samples.txt`"]


def evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    """The model card's evaluation section: each metric tuned vs base (evaluation.json)."""
    metrics = evaluation.get("metrics") or {}
    if not metrics:
        return []

    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "-"

    lines = ["## Evaluation", "", "| metric | tuned | base | delta | samples |", "| --- | --- | --- | --- | --- |"]
    for name, result in metrics.items():
        row = f"| {name} | {shown(result.get('tuned'))} | {shown(result.get('base'))} | {shown(result.get('delta'))} "
        lines.append(row + f"| {result.get('samples', '-')} |")
        if result.get("unavailable"):
            lines.append(f"| {name}: unavailable | {result['unavailable']} | | | |")
    gate = evaluation.get("gate")
    if gate:
        lines += ["", f"Promotion gate: {'passed' if gate['passed'] else 'FAILED'} — {gate.get('message', '')}"]
    return [*lines, "", "Answers per sample: `predictions.jsonl`; metrics: `evaluation.json`.", ""]
