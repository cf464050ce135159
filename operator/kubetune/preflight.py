"""Will the run fit the GPU? The estimate before a Job is created, and `kubetune estimate`.

The estimate (kubetune_trainer.estimate) needs the backbone's config.json and the memory of one
GPU. The operator never reads a Secret, so it reads config.json only where no credentials are
needed: an hf:// backbone from the hub (``HF_ENDPOINT`` or huggingface.co) and an s3:// backbone
from a bucket that allows anonymous reads. Elsewhere (a private bucket, a gated repository, a pvc://
or local path, an unreachable hub) it skips the estimate with an event, and the trainer checks the
real device before loading the weights. The GPU memory comes from ``resources.gpuMemory``, else from
a ``nvidia.com/gpu.memory`` node label (MiB, as GPU feature discovery writes it) that
``scheduling.nodeSelector`` pins.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kubetune import api
from kubetune_trainer.config import RunSections, StorageSpec, Strategy, TrainerConfig
from kubetune_trainer.estimate import Estimate, ModelConfigError, ModelShape, estimate_run, parse_quantity

Json = dict[str, Any]
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
FETCH_TIMEOUT_S = 5.0
CONFIG_MAX_BYTES = 1024 * 1024
HF_DEFAULT_ENDPOINT = "https://huggingface.co"


class ConfigUnavailable(Exception):
    """config.json cannot be read without credentials or a download; the estimate is skipped."""


@dataclass
class Verdict:
    outcome: Literal["fits", "wontfit", "skipped"]
    message: str
    estimate: Estimate | None = None


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


def http_get_json(url: str, timeout: float = FETCH_TIMEOUT_S) -> Json:
    """GET a small JSON document without credentials."""
    request = urllib.request.Request(url, headers={"User-Agent": "kubetune-operator"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(CONFIG_MAX_BYTES + 1)
    except urllib.error.HTTPError as err:
        raise ConfigUnavailable(f"{url}: HTTP {err.code} (private or missing; no credentials are used)") from err
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise ConfigUnavailable(f"{url}: unreachable: {getattr(err, 'reason', err)}") from err
    if len(body) > CONFIG_MAX_BYTES:
        raise ConfigUnavailable(f"{url}: larger than {CONFIG_MAX_BYTES} bytes, not a config.json")
    return json_object(body, url)


def json_object(text: str | bytes, where: object) -> Json:
    """A JSON object parsed from `text`; ConfigUnavailable naming `where` otherwise."""
    try:
        data = json.loads(text)
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
        from kubetune_trainer.sources import s3_endpoint, split_s3

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
    except ModelConfigError as err:
        return Verdict("skipped", f"cannot estimate GPU memory: {err}")
    got = estimate_run(shape, run, world_size=world_size, strategy=run_strategy(run), gpu_memory=memory)
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


def check_job(spec: api.FineTuneJobSpec, storage: StorageSpec,
              fetch: Callable[[str, StorageSpec, str | None], Json] = remote_config) -> Verdict | None:
    """The operator's check before creating the Job; None when there is nothing to check
    (no GPUs, or the GPU memory is unknown)."""
    if spec.resources.gpus < 1:
        return None
    memory = gpu_memory(spec)
    if memory is None:
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
        spec = api.FineTuneJobSpec.model_validate(jobs[0].get("spec") or {})
        memory = gpu_memory(spec)
        return spec, max(spec.resources.gpus, 1), None if memory is None else memory[0]
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ValueError(f"{path}: expected a FineTuneJob manifest or a trainer config")
    return TrainerConfig.model_validate(documents[0]), 1, None
