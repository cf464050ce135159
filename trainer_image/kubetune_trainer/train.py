"""The training run: data → model → a resumable, deterministic training loop → published outputs.

A hand-written loop rather than the HF Trainer: the data position is a pure function of the step
(seeded order per epoch), so a checkpoint only needs the step, the trained weights, the optimizer
and scheduler states and the RNG states; a resumed run continues exactly where the checkpoint was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kubetune_contract import events
from kubetune_contract.config import TrainerConfig
from kubetune_contract.estimate import Estimate

from . import artifacts, data, distributed, sources
from . import model as model_lib
from .errors import InvalidInput, OutOfMemory, Terminated, TrainerError
from .report import Reporter

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_MARKER = "checkpoint.json"
"""Written last into a checkpoint directory: a checkpoint without it is incomplete and ignored."""
CHECKPOINT_FORMAT = 2
CHECKPOINT_FILES = (
    "metrics.jsonl", "optimizer.pt", "rng.safetensors", "scheduler.pt", "state.json", "trainable.safetensors",
)
"""Every file of a checkpoint, sorted; the marker lists exactly these with their sizes and sha256."""
CONFIG_HASH_SECTIONS = ("model", "dataset", "training", "lora", "quantization")
CADENCE_FIELDS = ("evalEverySteps", "checkpointEverySteps", "logEverySteps", "memoryFraction")
"""training fields that do not change what is trained (the micro-batch that batchSize auto chooses
keeps each step's samples and loss weighting): left out of the config hash."""
PREDICTION_SAMPLES = 4
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = (
    torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
)
"""torch.cuda.OutOfMemoryError and, where torch has it, the device-independent torch.OutOfMemoryError."""


@dataclass
class Progress:
    """Where the run is; also read by ``__main__`` to describe a failure."""

    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    summary: dict[str, Any]
    model: Any
    tokenizer: Any


@dataclass
class FinalModel:
    """What the outputs take from the trained model, gathered before rank 0 publishes them."""

    predictions: list[dict[str, str]]
    state: dict[str, torch.Tensor] | None
    """A sharded model's trained weights (and persistent buffers), whole; None for an unsharded one,
    which saves from its own parameters."""


@dataclass
class Datasets:
    train: list[data.Example]
    validation: list[data.Example]


def load_datasets(config: TrainerConfig) -> Datasets:
    """Fetch and validate the data files; needs no tokenizer or model."""
    spec, storage = config.dataset, config.storage
    train_path = sources.resolve(spec.train, storage)
    train = data.load_examples(train_path, spec, spec.train)
    if spec.validation:
        validation = data.load_examples(sources.resolve(spec.validation, storage), spec, spec.validation)
    else:
        train, validation = data.split_examples(train, spec.validation_split, config.training.seed)
    log.info("data: %d training and %d validation examples", len(train), len(validation))
    return Datasets(train, validation)


def peak_memory_bytes(dev: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on the CPU."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class DeviceFit:
    """What the check at start decided: the micro-batch and gradient checkpointing to train with."""

    estimate: Estimate | None
    """The estimate at those settings (the out-of-memory message quotes it); None on the CPU or when
    config.json cannot be read here."""
    micro_batch: int
    gradient_checkpointing: bool


DeviceMemory = Callable[[], tuple[int, int]]
"""Free and total bytes of the training device, as torch.cuda.mem_get_info returns them."""


def check_device_memory(config: TrainerConfig, world: distributed.World, dev: torch.device,
                        device_memory: DeviceMemory | None = None) -> DeviceFit:
    """Estimate the run's peak GPU memory from the backbone's config.json (read before the weights),
    choose what training.batchSize / gradientCheckpointing auto leave open, and compare the estimate
    with the device's free memory: raise :class:`OutOfMemory` when it cannot fit.

    Without a device limit (the CPU, unless ``device_memory`` is given) batchSize auto is one
    micro-batch per process for the whole global batch and gradientCheckpointing auto is off; where
    config.json cannot be read on a GPU, the same micro-batch with checkpointing on."""
    tc = config.training
    micro = math.ceil(tc.global_batch(world.world_size) / world.world_size) if tc.auto_batch else tc.batch_size
    assert isinstance(micro, int)
    if device_memory is None:
        if dev.type != "cuda":
            return DeviceFit(None, micro, tc.gradient_checkpointing is True)
        device_memory = lambda: torch.cuda.mem_get_info(dev)  # noqa: E731
    from kubetune_contract.estimate import ModelConfigError, ModelShape, RunSettings, auto_fit, device_verdict, estimate

    source = config.model.source.rstrip("/") + "/config.json"
    try:
        path = sources.resolve(source, config.storage, config.model.revision)
        shape = ModelShape.from_config(json.loads(Path(path).read_text()))
    except (TrainerError, OSError, ValueError, ModelConfigError) as err:
        log.warning("GPU memory not estimated: %s", err)
        return DeviceFit(None, micro, tc.gradient_checkpointing is not False)
    settings = RunSettings.from_run(config, world_size=world.world_size, strategy=config.distribution.strategy,
                                    micro_batch=micro)
    free, total = device_memory()
    if tc.auto_batch or tc.gradient_checkpointing == "auto":
        settings = auto_fit(shape, config, settings, tc.memory_fraction * free)
        log.info("auto-fit (%.0f%% of %.2f GiB free): micro-batch %d, gradient checkpointing %s",
                 100 * tc.memory_fraction, free / 2**30, settings.micro_batch,
                 "on" if settings.gradient_checkpointing else "off")
    got = estimate(shape, settings)
    outcome, message = device_verdict(got, free, total)
    if outcome == "wontfit":
        raise OutOfMemory(f"the run cannot fit this GPU: {message}")
    (log.warning if outcome == "tight" else log.info)("GPU memory (micro-batch %d): %s", settings.micro_batch, message)
    return DeviceFit(got, settings.micro_batch, settings.gradient_checkpointing)


def halve_micro_batch(batch_size: int, accumulation: int) -> tuple[int, int]:
    """Half the micro-batch, and enough more forward passes to keep ``batch_size * accumulation``."""
    smaller = max(1, batch_size // 2)
    return smaller, math.ceil(batch_size * accumulation / smaller)


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> Any:
    """torch AdamW/SGD, or a bitsandbytes 8-bit / paged AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,  # type: ignore[attr-defined]
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,  # type: ignore[attr-defined]
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,  # type: ignore[attr-defined]
    }[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def total_steps(config: TrainerConfig, train_samples: int, world_size: int = 1) -> int:
    """maxSteps, or epochs (default one) of optimizer steps of the global batch."""
    if config.training.max_steps is not None:
        return config.training.max_steps
    tc = config.training
    steps_per_epoch = math.ceil(train_samples / tc.global_batch(world_size))
    return max(1, math.ceil((tc.epochs or 1.0) * steps_per_epoch))


class DataOrder:
    """Which samples each optimizer step trains on, and which of them each rank's micro-batches take.

    An epoch is a seeded permutation of the samples, cut into global batches of ``global_batch``
    samples, by default ``batch_size * gradient_accumulation * world_size`` (the epoch's last one may
    be smaller). The global batch of a step depends only on the seed, the step and its size, so it is
    the same set whatever the split into micro-batches and ranks: micro-batch ``k`` of rank ``r``
    is the ``(k * world_size + r)``-th slice of ``batch_size`` samples of it.
    """

    def __init__(self, samples: int, batch_size: int, accumulation: int, world_size: int, seed: int,
                 global_batch: int | None = None) -> None:
        self.samples, self.batch_size, self.world_size, self.seed = samples, batch_size, world_size, seed
        self.global_batch = global_batch or batch_size * accumulation * world_size
        self.steps_per_epoch = math.ceil(samples / self.global_batch)
        self._epoch, self._order = -1, list[int]()

    def step(self, step: int) -> list[int]:
        """Indices of the samples of optimizer step ``step`` (1-based), over every rank."""
        epoch, position = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.samples, generator=generator).tolist()
        return self._order[position * self.global_batch : (position + 1) * self.global_batch]

    def micro_batch(self, step_samples: list[int], k: int, rank: int) -> list[int]:
        """Rank ``rank``'s ``k``-th micro-batch of a step; empty where the step's batch has run out."""
        first = (k * self.world_size + rank) * self.batch_size
        return step_samples[first : first + self.batch_size]


def target_tokens(sample: data.Sample) -> int:
    """Tokens of ``sample`` that its loss is taken on: labels after the one-token shift, not ignored."""
    return sum(1 for label in sample.labels[1:] if label != data.IGNORE_INDEX)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of the next-token predictions; 0 where the label is ignored."""
    shifted = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), shifted.reshape(-1),
        ignore_index=data.IGNORE_INDEX, reduction="none",
    )
    return losses.view(shifted.shape)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token losses of a batch (a 0-d fp32 tensor on the logits' device)."""
    return token_losses(logits, labels).sum()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step on one rank (dropout masks)."""
    return (seed * 1_000_003 + step * 4099 + rank) % 2**63


def config_hash(config: TrainerConfig) -> str:
    """sha256 of what decides the trained weights: the model, dataset, training, lora and quantization
    sections (camelCase JSON, sorted keys), without the evaluation/checkpoint/log cadence and
    memoryFraction; an unset globalBatchSize is left out, so that configs written before it existed
    keep their hash."""
    sections = config.model_dump(by_alias=True, mode="json", include=set(CONFIG_HASH_SECTIONS))
    for name in CADENCE_FIELDS:
        sections["training"].pop(name, None)
    if sections["training"].get("globalBatchSize") is None:
        sections["training"].pop("globalBatchSize", None)
    return hashlib.sha256(json.dumps(sections, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RejectedCheckpoint(Exception):
    """A checkpoint that must not be resumed from; the message says why."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint read and checked, not yet applied to the model and optimizer."""

    step: int
    epoch: float
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    grad_scaler: dict[str, Any]
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    python_rng: tuple[Any, ...]
    metrics: str
    events: list[dict[str, Any]]


GRAD_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def parse_checkpoint(local: Path, step: int, model: Any, scheduler: Any) -> LoadedCheckpoint:
    """Read the files of a downloaded checkpoint as plain data and check them against the model.

    Tensors come from safetensors; the optimizer and scheduler states through ``torch.load`` with
    ``weights_only=True`` (tensors and plain containers only: a pickle that names any other callable
    is refused, never run). Raises RejectedCheckpoint.
    """
    try:
        trainable = load_file(str(local / "trainable.safetensors"))
    except Exception as err:
        raise RejectedCheckpoint(f"trainable.safetensors cannot be read: {err}") from err
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    got = {name: tuple(t.shape) for name, t in trainable.items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
        raise RejectedCheckpoint(f"trainable.safetensors does not match the model's trained weights: {differ[:3]}")

    states: dict[str, dict[str, Any]] = {}
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            state = torch.load(local / name, weights_only=True)
        except Exception as err:  # pickle.UnpicklingError for anything but tensors and containers
            raise RejectedCheckpoint(f"{name} cannot be loaded as plain data: {err}") from err
        if not isinstance(state, dict):
            raise RejectedCheckpoint(f"{name} holds {type(state).__name__}, not a state dict")
        states[name] = state
    if not {"state", "param_groups"} <= set(states["optimizer.pt"]):
        raise RejectedCheckpoint("optimizer.pt is not an optimizer state dict")
    if set(states["scheduler.pt"]) != set(scheduler.state_dict()):
        raise RejectedCheckpoint(f"scheduler.pt has keys {sorted(states['scheduler.pt'])}, "
                                 f"the scheduler has {sorted(scheduler.state_dict())}")

    try:
        rng = load_file(str(local / "rng.safetensors"))
    except Exception as err:
        raise RejectedCheckpoint(f"rng.safetensors cannot be read: {err}") from err
    torch_rng = rng.get("torch")
    if torch_rng is None or torch_rng.dtype != torch.uint8 or torch_rng.shape != torch.get_rng_state().shape:
        raise RejectedCheckpoint("rng.safetensors holds no valid torch RNG state")
    cuda_keys = sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]) if k[5:].isdigit() else -1)
    if set(rng) - {"torch", *cuda_keys} or cuda_keys != [f"cuda.{i}" for i in range(len(cuda_keys))] or any(
        rng[k].dtype != torch.uint8 or rng[k].dim() != 1 for k in cuda_keys
    ):
        raise RejectedCheckpoint(f"rng.safetensors has unexpected tensors {sorted(rng)}")

    try:
        state = json.loads((local / "state.json").read_text())
        python_random = state["pythonRandom"]
        python_rng = (python_random["version"], tuple(python_random["state"]), python_random["gauss"])
        random.Random().setstate(python_rng)  # validates without touching the global generator
        epoch = float(state["epoch"])
        grad_scaler = state["gradScaler"]
        if state["step"] != step or not isinstance(grad_scaler, dict):
            raise ValueError(f"step {state['step']!r}, gradScaler {grad_scaler!r}")
        if grad_scaler and (set(grad_scaler) != GRAD_SCALER_KEYS or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in grad_scaler.values()
        )):
            raise ValueError(f"gradScaler {grad_scaler!r}")
    except Exception as err:
        raise RejectedCheckpoint(f"state.json is not a valid training state: {type(err).__name__}: {err}") from err

    try:
        metrics = (local / "metrics.jsonl").read_text()
        events = [json.loads(line) for line in metrics.splitlines() if line]
        if not all(isinstance(e, dict) for e in events):
            raise ValueError("a line is not a JSON object")
    except Exception as err:
        raise RejectedCheckpoint(f"metrics.jsonl is not JSON lines: {err}") from err

    return LoadedCheckpoint(
        step=step, epoch=epoch, trainable=trainable, optimizer=states["optimizer.pt"],
        scheduler=states["scheduler.pt"], grad_scaler=grad_scaler, torch_rng=torch_rng,
        cuda_rng=[rng[k] for k in cuda_keys], python_rng=python_rng, metrics=metrics, events=events,
    )


class Trainer:
    """One run of a :class:`TrainerConfig`."""

    def __init__(
        self, config: TrainerConfig, reporter: Reporter | None = None, world: distributed.World | None = None
    ) -> None:
        self.config = config
        self.world = world if world is not None else distributed.world_from_env()
        self.progress = Progress()
        self.work = Path(tempfile.mkdtemp(prefix="kubetune-run-"))
        self.reporter = reporter or Reporter()
        if self.reporter.metrics_path is None:
            self.reporter.metrics_path = self.work / "metrics.jsonl"
        self.metrics_path: Path = self.reporter.metrics_path
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")
        self.store: artifacts.Store | None = None
        self.in_loop = False
        self.stop_requested = False
        self.memory_estimate: Estimate | None = None
        batch = config.training.batch_size
        self.micro_batch_size = batch if isinstance(batch, int) else 1
        """The micro-batch in use: training.batchSize, or what batchSize auto chose (and halved on an
        out-of-memory)."""
        self.gradient_checkpointing = config.training.gradient_checkpointing is not False
        """Whether the model recomputes activations: training.gradientCheckpointing, or what auto chose."""
        self.device_memory: DeviceMemory | None = None
        """Free and total bytes of the device for the check at start; None: torch.cuda.mem_get_info on
        a GPU, no limit on the CPU."""
        self.rejected: set[int] = set()
        """Steps of checkpoints in the store that resume() refused; pruned once a new one is written."""
        self.sharded = False
        """The model is sharded over the ranks (distribution.strategy fsdp): its forward passes, and
        gathering its weights, are collective, so every rank takes part in them."""

    def close(self) -> None:
        """Leave the process group and remove the local working directory (staged outputs and
        checkpoints). The caller closes once it has reported how the run ended."""
        distributed.shutdown()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- setup --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train and publish; on SIGTERM, checkpoint (when in the loop) and raise Terminated.

        An accelerator out-of-memory error becomes :class:`OutOfMemory` with settings to change.
        """
        try:
            distributed.init(self.world)
            if threading.current_thread() is not threading.main_thread():
                result = self._run()
            else:
                previous = signal.signal(signal.SIGTERM, self._on_sigterm)
                try:
                    result = self._run()
                finally:
                    signal.signal(signal.SIGTERM, previous)
            return result
        except OUT_OF_MEMORY_ERRORS as err:
            raise OutOfMemory(self.out_of_memory_message(err)) from err

    def out_of_memory_message(self, err: BaseException) -> str:
        cfg, tc = self.config, self.config.training
        step = self.progress.step
        where = f"during step {step + 1}" if self.in_loop else f"outside the training loop (at step {step})"
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        hints = [
            *([f"quantization int4 (now {cfg.quantization})"] if cfg.quantization != "int4" and cfg.lora.enabled
              else []),
            f"a smaller dataset.maxLength (now {cfg.dataset.max_length})",
            *([f"a smaller training.batchSize (now {self.micro_batch_size}; raise training.gradientAccumulation "
               "to keep the effective batch)"] if self.micro_batch_size > 1 and not tc.auto_batch else []),
            *(["training.batchSize: auto with training.globalBatchSize"]
              if not tc.auto_batch and self.micro_batch_size > 1 else []),
            *(["training.gradientCheckpointing: true or auto"] if not self.gradient_checkpointing else []),
            "or more GPUs",
        ]
        estimate = ""
        if self.memory_estimate is not None:
            got = self.memory_estimate
            estimate = (f" (estimated peak {got.peak / 2**30:.1f} GiB per GPU: weights {got.weights / 2**30:.1f}, "
                        f"activations {got.activations / 2**30:.1f}, logits {got.logits / 2**30:.1f} GiB)")
        return f"out of accelerator memory {where}: {detail}{estimate}. To fit, try " + ", ".join(hints)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.in_loop:
            # Finish the current step, write a checkpoint, then stop (see loop()).
            log.warning("SIGTERM: stopping after the current step")
            self.stop_requested = True
        else:
            raise Terminated(f"stopped by SIGTERM at step {self.progress.step}")

    def _run(self) -> RunResult:
        cfg, world = self.config, self.world
        if cfg.distribution.strategy == "fsdp" and not world.distributed:
            raise InvalidInput(
                "distribution.strategy fsdp shards the model across the training processes and this run has "
                "one: start it under torchrun with 2 or more processes (--nproc-per-node), or use strategy ddp"
            )
        torch.manual_seed(cfg.training.seed)
        random.seed(cfg.training.seed)
        self.store = artifacts.open_store(cfg.output.location, cfg.run_name, cfg.storage)
        # The first process of each machine checks the data and fills the download cache; the others
        # then find it there. When it fails, every rank fails with its reason (World.agree).
        if world.local_rank == 0:
            with world.fail_together():
                datasets, model_path, tokenizer_path = self._prepare()
        else:
            world.agree(None)
            datasets, model_path, tokenizer_path = self._prepare()
        tokenizer = model_lib.load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
        train_samples = data.tokenize(datasets.train, cfg.dataset, tokenizer)
        val_samples = data.tokenize(datasets.validation, cfg.dataset, tokenizer)
        if cfg.training.packing:
            train_samples = data.pack(train_samples, cfg.dataset.max_length)
            log.info("packing: %d blocks of up to %d tokens", len(train_samples), cfg.dataset.max_length)

        dev = world.device()
        precision = model_lib.resolve_precision(cfg.training.precision, dev)
        torch.manual_seed(cfg.training.seed)  # adapter initialisation, the same on every rank
        model = model_lib.load_model(model_path, cfg, precision, dev, self.gradient_checkpointing)
        self.loop(model, tokenizer, train_samples, val_samples, dev, precision)
        final = self.final_model(model, tokenizer, datasets, dev)
        # Over several pods, a pod whose processes exit 0 completes its index of the Indexed Job for
        # good, so no rank ends before rank 0 has published; when rank 0 fails, every rank fails.
        if not world.is_main:
            world.agree(None)
            return RunResult({}, model, tokenizer)
        with world.fail_together():
            summary = self.finish(model, tokenizer, model_path, datasets, final, dev, precision)
        return RunResult(summary, model, tokenizer)

    def _prepare(self) -> tuple[Datasets, Path, Path]:
        """Read and check the data, fit the batch to the device, and resolve the model and tokenizer
        to local directories (downloading them into the cache)."""
        cfg = self.config
        datasets = load_datasets(cfg)
        fit = check_device_memory(cfg, self.world, self.world.device(), self.device_memory)
        self.memory_estimate, self.micro_batch_size = fit.estimate, fit.micro_batch
        self.gradient_checkpointing = fit.gradient_checkpointing
        model_path = sources.resolve(cfg.model.source, cfg.storage, cfg.model.revision, directory=True)
        tokenizer_path = (
            sources.resolve(cfg.model.tokenizer, cfg.storage, cfg.model.revision, directory=True)
            if cfg.model.tokenizer
            else model_path
        )
        return datasets, model_path, tokenizer_path

    # -- the loop -----------------------------------------------------------------------------

    def loop(
        self,
        model: Any,
        tokenizer: Any,
        train_samples: list[data.Sample],
        val_samples: list[data.Sample],
        dev: torch.device,
        precision: model_lib.Precision,
    ) -> None:
        cfg, tc, world = self.config, self.config.training, self.world
        # The global batch is the config's; the micro-batch is training.batchSize or what batchSize auto
        # chose, and the accumulation makes up the rest.
        global_batch = tc.global_batch(world.world_size)
        batch_size = self.micro_batch_size
        accum = math.ceil(global_batch / (batch_size * world.world_size))
        order = DataOrder(len(train_samples), batch_size, accum, world.world_size, tc.seed, global_batch=global_batch)
        steps = total_steps(cfg, len(train_samples), world.world_size)
        self.progress.total_steps = steps
        # DDP keeps the model's parameters; FSDP replaces them with their shards, so the optimizer
        # is made for the parameters of the wrapped model.
        engine = distributed.wrap(model, world, dev, cfg.distribution.strategy)
        self.sharded = world.distributed and cfg.distribution.strategy == "fsdp"
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(tc.optimizer, params, tc.learning_rate, tc.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=int(tc.warmup_ratio * steps), num_training_steps=steps
        )
        scaler = torch.amp.GradScaler(dev.type, enabled=precision.dtype == torch.float16 and dev.type == "cuda")
        pad_id = tokenizer.pad_token_id
        targets = [target_tokens(s) for s in train_samples]
        log.info(
            "training: %d steps, %d samples, batch size %d per device, gradient accumulation %d, %d process(es): "
            "%d samples and %d steps per epoch",
            steps, len(train_samples), batch_size, accum, world.world_size, order.global_batch, order.steps_per_epoch,
        )

        start = self.resume(model, optimizer, scheduler, scaler)
        if start == 0:
            self.report(0, dev, None, self.evaluate(model, val_samples, pad_id, dev, precision))

        model.train()
        self.in_loop = True
        # The running loss stays on the device: reading it back costs a host sync, so that happens
        # only when progress is reported.
        window_loss = torch.zeros((), dtype=torch.float32, device=dev)
        window_targets = 0
        # Throughput counts training compute only (not evaluation or checkpoint uploads); the ETA
        # uses wall time, which includes them.
        window_tokens, window_time = 0, 0.0
        total_tokens, total_time = 0, 0.0
        loop_start = time.perf_counter()
        compute_start = time.perf_counter()
        for step in range(start + 1, steps + 1):
            step_samples = order.step(step)
            # Every rank knows the whole global batch, so the step's target-token count needs no
            # communication; each token's loss weighs 1 / step_targets in the step's gradient.
            step_targets = sum(targets[i] for i in step_samples)
            # DDP and FSDP average gradients over the ranks; scale so that their mean is the sum over ranks.
            scale = world.world_size / max(step_targets, 1)
            while True:
                # Dropout masks depend on the step and the rank only: a resumed run, and every rank,
                # draws the masks the uninterrupted run would.
                torch.manual_seed(step_seed(tc.seed, step, world.rank))
                try:
                    step_loss = torch.zeros((), dtype=torch.float32, device=dev)
                    for k in range(accum):
                        chosen = order.micro_batch(step_samples, k, world.rank)
                        weight = 1.0
                        if not chosen:
                            if not world.distributed:
                                continue
                            # This rank has no samples left in the epoch's last step: it still takes
                            # part in the collectives (DDP's gradient all-reduce; FSDP's all-gathers
                            # and reduce-scatters), with a sample that contributes nothing.
                            chosen, weight = step_samples[:1], 0.0
                        # DDP all-reduces once per step, after the last micro-batch; FSDP
                        # reduce-scatters after each, so that the gradients stay sharded.
                        no_sync = world.distributed and not self.sharded and k != accum - 1
                        step_loss += self.micro_step(engine, train_samples, chosen, pad_id, dev, precision, scaler,
                                                     scale, weight, no_sync=no_sync)
                    break
                except OUT_OF_MEMORY_ERRORS as err:
                    if not tc.auto_batch or world.distributed or batch_size == 1:
                        raise
                    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                # Out of the except block, so that its traceback no longer holds the step's tensors.
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), dtype=torch.float32, device=dev)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                batch_size, accum = halve_micro_batch(batch_size, accum)
                order.batch_size = batch_size
                self.micro_batch_size = batch_size
                log.warning("out of memory in step %d (%s): micro-batch %d, gradient accumulation %d from now "
                            "on (the global batch stays %d); repeating the step", step, detail, batch_size, accum,
                            order.global_batch)
            window_loss += step_loss
            window_targets += step_targets
            window_tokens += sum(len(train_samples[i].input_ids) for i in step_samples)
            if tc.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            self.progress.step = step
            self.progress.epoch = step / order.steps_per_epoch
            do_eval = step % tc.eval_every_steps == 0 or step == steps
            do_log = step % tc.log_every_steps == 0 or do_eval or step == steps
            stop = world.any(self.stop_requested, dev) if world.distributed else self.stop_requested
            do_checkpoint = step % tc.checkpoint_every_steps == 0 or step == steps or stop
            if do_log or do_checkpoint:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                window_time += time.perf_counter() - compute_start
            if do_log:
                now = time.perf_counter()
                loss_total = world.all_reduce_sum([float(window_loss)], dev)[0]
                self.progress.train_loss = loss_total / max(window_targets, 1)
                self.progress.learning_rate = float(scheduler.get_last_lr()[0])
                self.progress.tokens_per_second = window_tokens / max(window_time, 1e-9)
                eta = (steps - step) * (now - loop_start) / (step - start)
                eval_loss = self.evaluate(model, val_samples, pad_id, dev, precision) if do_eval else None
                self.report(step, dev, eta, eval_loss)
                total_tokens, total_time = total_tokens + window_tokens, total_time + window_time
                window_loss.zero_()
                window_targets, window_tokens, window_time = 0, 0, 0.0
            if do_checkpoint:
                # No rank starts the next step before the checkpoint of this one is in the store;
                # when rank 0 cannot write it (the store is away: exit 5), every rank stops so.
                with world.fail_together():
                    self.checkpoint(model, optimizer, scheduler, scaler, step)
            if stop:
                raise Terminated(f"stopped by SIGTERM at step {step}; a checkpoint of step {step} was written")
            if do_log or do_checkpoint:
                compute_start = time.perf_counter()
        self.in_loop = False
        if total_tokens:
            self.progress.tokens_per_second = total_tokens / max(total_time, 1e-9)
            log.info("trained %d steps in %.1fs (%.1fs of compute): %.0f tokens/s", steps - start,
                     time.perf_counter() - loop_start, total_time, self.progress.tokens_per_second)

    def micro_step(self, engine: Any, samples: list[data.Sample], chosen: list[int], pad_id: int,
                   dev: torch.device, precision: model_lib.Precision, scaler: Any, scale: float, weight: float,
                   no_sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (``chosen`` indices of ``samples``); its detached
        loss sum times ``weight``. ``scale`` weighs its tokens' losses in the step's gradient."""
        batch = data.collate([samples[i] for i in chosen], pad_id)
        with contextlib.ExitStack() as stack:
            if no_sync:
                stack.enter_context(engine.no_sync())
            with torch.autocast(dev.type, dtype=precision.dtype, enabled=precision.autocast):
                logits = engine(
                    input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                    **({"position_ids": batch["position_ids"].to(dev)} if "position_ids" in batch else {}),
                ).logits
            loss_sum = token_loss_sum(logits, batch["labels"].to(dev)) * weight
            scaler.scale(loss_sum * scale).backward()
        return loss_sum.detach()

    def evaluate(
        self, model: Any, samples: list[data.Sample], pad_id: int, dev: torch.device, precision: model_lib.Precision
    ) -> float:
        """Mean loss per answer token over the validation samples (each rank takes every N-th batch)."""
        was_training = model.training
        model.eval()
        world = self.world
        total = torch.zeros((), dtype=torch.float64, device=dev)
        count = 0
        batch_size = self.micro_batch_size
        starts = range(0, len(samples), batch_size)
        mine: list[int | None] = list(starts[world.rank :: world.world_size])
        if self.sharded:
            # Each forward pass of a sharded model is collective: every rank runs as many as the
            # rank with the most batches, the extra ones on a batch whose loss is not counted.
            mine += [None] * (math.ceil(len(starts) / world.world_size) - len(mine))
        with torch.no_grad():
            for i in mine:
                batch = data.collate(samples[i or 0 : (i or 0) + batch_size], pad_id)
                with torch.autocast(dev.type, dtype=precision.dtype, enabled=precision.autocast):
                    logits = model(
                        input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                        **({"position_ids": batch["position_ids"].to(dev)} if "position_ids" in batch else {}),
                    ).logits
                if i is None:
                    continue
                total += token_loss_sum(logits, batch["labels"].to(dev))
                count += int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
        if was_training:
            model.train()
        loss_sum, count_sum = world.all_reduce_sum([float(total), float(count)], dev)
        self.progress.eval_loss = loss_sum / max(count_sum, 1)
        return self.progress.eval_loss

    def report(self, step: int, dev: torch.device, eta: float | None, eval_loss: float | None) -> None:
        p = self.progress
        report = events.ProgressReport(
            step=step,
            total_steps=p.total_steps,
            epoch=round(p.epoch, 4),
            train_loss=p.train_loss if step else None,
            learning_rate=p.learning_rate,
            eval_loss=eval_loss,
            perplexity=perplexity(eval_loss),
            tokens_per_second=round(p.tokens_per_second, 1) if p.tokens_per_second and step else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            peak_memory_bytes=peak_memory_bytes(dev),
        )
        event = events.event_json(report)
        p.events.append(event)
        self.reporter.emit(event)

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, model: Any, optimizer: Any, scheduler: Any, scaler: Any, step: int) -> None:
        """Rank 0 writes a checkpoint to the store; its marker goes last, then old checkpoints are
        pruned. Every rank calls it: a sharded model's weights and optimizer state are gathered first.

        The files are the same whatever the strategy: whole trained weights, and the optimizer state
        dict of an unsharded optimizer."""
        trained: dict[str, torch.Tensor] = {}
        optimizer_state: dict[str, Any] = {}
        if self.sharded:
            trained = distributed.gather_trainable_state(model)
            optimizer_state = distributed.gather_optimizer_state(model, optimizer)
        elif self.world.is_main:
            trained, optimizer_state = model_lib.trainable_state(model), optimizer.state_dict()
        if not self.world.is_main:
            return
        assert self.store is not None
        local = self.work / "checkpoint"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir()
        save_file(trained, str(local / "trainable.safetensors"))
        torch.save(optimizer_state, local / "optimizer.pt")
        torch.save(scheduler.state_dict(), local / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(local / "rng.safetensors"))
        shutil.copyfile(self.metrics_path, local / "metrics.jsonl")
        version, internal, gauss = random.getstate()
        state = {
            "step": step,
            "epoch": self.progress.epoch,
            "pythonRandom": {"version": version, "state": list(internal), "gauss": gauss},
            "gradScaler": scaler.state_dict(),
        }
        (local / "state.json").write_text(json.dumps(state))
        prefix = f"{CHECKPOINT_DIR}/step-{step}"
        if step in self.rejected:
            # Nothing of a rejected checkpoint of the same step may stay next to the new files.
            self.delete_checkpoint(step)
            self.rejected.discard(step)
        files = []
        for name in CHECKPOINT_FILES:
            path = local / name
            files.append({"name": name, "size": path.stat().st_size, "sha256": artifacts.sha256_of(path)})
            self.store.put_file(path, f"{prefix}/{name}")
        marker = local / CHECKPOINT_MARKER
        marker.write_text(json.dumps({
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "runName": self.config.run_name,
            "configHash": config_hash(self.config),
            "files": files,
        }))
        self.store.put_file(marker, f"{prefix}/{CHECKPOINT_MARKER}")
        log.info("checkpoint at step %d: %s/%s", step, self.store.uri, prefix)
        self.reporter.emit({"type": "checkpoint", "step": step, "location": f"{self.store.uri}/{prefix}"},
                           record=False)
        self.prune_checkpoints()

    def checkpoints(self) -> tuple[list[int], list[int]]:
        """Steps of the complete and of the incomplete checkpoints in the store, oldest first."""
        assert self.store is not None
        keys = self.store.list(f"{CHECKPOINT_DIR}/")
        steps: dict[int, bool] = {}
        for key in keys:
            parts = key.split("/")
            if len(parts) == 3 and parts[1].startswith("step-") and parts[1][5:].isdigit():
                step = int(parts[1][5:])
                steps[step] = steps.get(step, False) or parts[2] == CHECKPOINT_MARKER
        complete = sorted(s for s, done in steps.items() if done)
        return complete, sorted(s for s, done in steps.items() if not done)

    def prune_checkpoints(self) -> None:
        """Keep the newest output.keepCheckpoints valid checkpoints; drop rejected and older partial ones."""
        assert self.store is not None
        complete, incomplete = self.checkpoints()
        valid = [s for s in complete if s not in self.rejected]
        stale = valid[: -self.config.output.keep_checkpoints]
        newest = valid[-1] if valid else -1
        stale += [s for s in complete if s in self.rejected]
        stale += [s for s in incomplete if s < newest]
        for step in stale:
            self.delete_checkpoint(step)
        self.rejected.difference_update(stale)

    def delete_checkpoint(self, step: int) -> None:
        assert self.store is not None
        keys = self.store.list(f"{CHECKPOINT_DIR}/step-{step}/")
        # The marker first: a half-deleted checkpoint must not look complete.
        for key in sorted(keys, key=lambda k: not k.endswith(CHECKPOINT_MARKER)):
            self.store.delete(key)

    def resume(self, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> int:
        """Load the newest valid checkpoint of this run, if any; return its step (0 when starting fresh).

        A checkpoint is only data: no file is unpickled beyond tensors and plain containers, and one
        that belongs to another run or config, or does not match its marker, is skipped with a
        warning (the next older one is tried). Every rank must choose rank 0's checkpoint; they
        agree before any is loaded (loading into a sharded model is collective).
        """
        assert self.store is not None
        loaded = self.newest_valid_checkpoint(model, scheduler)
        step = loaded.step if loaded is not None else 0
        agreed = self.world.broadcast_int(step, self.world.device())
        if agreed != step:
            raise RuntimeError(f"rank {self.world.rank} resumes from step {step}, rank 0 from step {agreed}")
        if loaded is None:
            if self.rejected:
                log.warning("no usable checkpoint in %s/%s; starting from step 0", self.store.uri, CHECKPOINT_DIR)
            return 0
        self.apply_checkpoint(loaded, model, optimizer, scheduler, scaler)
        log.info("resuming from step %d (%s/%s/step-%d)", step, self.store.uri, CHECKPOINT_DIR, step)
        return step

    def newest_valid_checkpoint(self, model: Any, scheduler: Any) -> LoadedCheckpoint | None:
        """The newest checkpoint of this run that passes every check, read but not applied."""
        assert self.store is not None
        complete, _ = self.checkpoints()
        for step in reversed(complete):
            try:
                return self.read_checkpoint(step, model, scheduler)
            except RejectedCheckpoint as err:
                log.warning("checkpoint %s/%s/step-%d rejected: %s", self.store.uri, CHECKPOINT_DIR, step, err)
                self.rejected.add(step)
        return None

    def read_checkpoint(self, step: int, model: Any, scheduler: Any) -> LoadedCheckpoint:
        """Download and check one checkpoint without touching the model; raise RejectedCheckpoint."""
        assert self.store is not None
        prefix = f"{CHECKPOINT_DIR}/step-{step}"
        local = self.work / "resume" / f"step-{step}"
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        self.store.get_file(f"{prefix}/{CHECKPOINT_MARKER}", local / CHECKPOINT_MARKER)
        try:
            marker = json.loads((local / CHECKPOINT_MARKER).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RejectedCheckpoint(f"{CHECKPOINT_MARKER} is not JSON: {err}") from err
        if not isinstance(marker, dict) or marker.get("format") != CHECKPOINT_FORMAT:
            raise RejectedCheckpoint(
                f"{CHECKPOINT_MARKER} is not checkpoint format {CHECKPOINT_FORMAT} (written by an older trainer, "
                "or not by the trainer at all)"
            )
        if marker.get("runName") != self.config.run_name:
            raise RejectedCheckpoint(
                f"it belongs to run {marker.get('runName')!r}, not {self.config.run_name!r}"
            )
        if marker.get("configHash") != config_hash(self.config):
            raise RejectedCheckpoint(
                "it was written with another config (configHash differs in the model, dataset, training, lora "
                "or quantization section)"
            )
        total = self.progress.total_steps or 0
        if marker.get("step") != step or not 1 <= step <= total:
            raise RejectedCheckpoint(
                f"its step {marker.get('step')!r} (directory step-{step}) is outside 1..{total}"
            )
        files = marker.get("files")
        entries: list[dict[str, Any]] = files if isinstance(files, list) else []
        names = sorted(str(e.get("name")) for e in entries if isinstance(e, dict))
        if len(names) != len(entries) or names != list(CHECKPOINT_FILES):
            raise RejectedCheckpoint(f"its files list {files!r} does not name exactly {list(CHECKPOINT_FILES)}")
        present = {key.rsplit("/", 1)[-1] for key in self.store.list(f"{prefix}/")}
        missing = sorted(set(CHECKPOINT_FILES) - present)
        if missing:
            raise RejectedCheckpoint(f"{', '.join(missing)} listed in {CHECKPOINT_MARKER} but missing")
        for entry in entries:
            name, path = entry["name"], local / entry["name"]
            self.store.get_file(f"{prefix}/{name}", path)
            size, digest = path.stat().st_size, artifacts.sha256_of(path)
            if size != entry.get("size") or digest != entry.get("sha256"):
                raise RejectedCheckpoint(f"{name} has size {size} sha256 {digest}, the marker says "
                                         f"{entry.get('size')} {entry.get('sha256')}")
        return parse_checkpoint(local, step, model, scheduler)

    def apply_checkpoint(
        self, loaded: LoadedCheckpoint, model: Any, optimizer: Any, scheduler: Any, scaler: Any
    ) -> None:
        if self.sharded:
            distributed.load_sharded_state(model, optimizer, loaded.trainable, loaded.optimizer)
        else:
            model_lib.load_trainable_state(model, loaded.trainable)
            optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        if loaded.grad_scaler and scaler.is_enabled():
            scaler.load_state_dict(loaded.grad_scaler)
        torch.set_rng_state(loaded.torch_rng)
        if torch.cuda.is_available():
            for index, state in enumerate(loaded.cuda_rng[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)
        random.setstate(loaded.python_rng)
        self.metrics_path.write_text(loaded.metrics)
        self.progress.events = list(loaded.events)
        self.progress.step, self.progress.epoch = loaded.step, loaded.epoch
        for event in self.progress.events:
            report = events.ProgressReport.model_validate(event)
            if report.train_loss is not None:
                self.progress.train_loss = report.train_loss
                self.progress.learning_rate = report.learning_rate
            if report.eval_loss is not None:
                self.progress.eval_loss = report.eval_loss

    # -- outputs ------------------------------------------------------------------------------

    def final_model(self, model: Any, tokenizer: Any, datasets: Datasets, dev: torch.device) -> FinalModel:
        """The greedy predictions and, for a sharded model, its trained weights gathered whole.

        Rank 0's alone, except for a sharded model: then every rank generates (in step, HF's
        ``synced_gpus``) and takes part in the gather, and rank 0 keeps the results."""
        if not (self.world.is_main or self.sharded):
            return FinalModel([], None)
        model.eval()
        examples = datasets.validation[:PREDICTION_SAMPLES]
        predictions = generate_predictions(model, tokenizer, self.config, examples, dev, synced=self.sharded)
        return FinalModel(predictions, distributed.gather_model_state(model) if self.sharded else None)

    def finish(
        self,
        model: Any,
        tokenizer: Any,
        model_path: Path,
        datasets: Datasets,
        final: FinalModel,
        dev: torch.device,
        precision: model_lib.Precision,
    ) -> dict[str, Any]:
        """Save the outputs to a staging directory, publish them, and return the summary."""
        assert self.store is not None
        cfg = self.config
        out = self.work / "outputs"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in final.predictions))
        adapter_dir = merged_dir = None
        if cfg.lora.enabled:
            adapter_dir = out / "adapter"
            # A sharded model saves from its gathered state: the same files as an unsharded one.
            model.save_pretrained(str(adapter_dir), state_dict=final.state)
            # Name the backbone by its source, not by the local cache path it was loaded from.
            adapter_config = adapter_dir / "adapter_config.json"
            settings = json.loads(adapter_config.read_text())
            settings["base_model_name_or_path"] = cfg.model.source
            settings["revision"] = cfg.model.revision
            adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
            tokenizer.save_pretrained(str(adapter_dir))
            if cfg.output.merge_adapter:
                merged_dir = out / "merged"
                merge_adapter(model_path, adapter_dir, merged_dir, cfg, precision)
                tokenizer.save_pretrained(str(merged_dir))
        else:
            merged_dir = out / "model"
            model.save_pretrained(str(merged_dir), state_dict=final.state)
            tokenizer.save_pretrained(str(merged_dir))
        config_json = cfg.model_dump(by_alias=True, mode="json")
        (out / "trainer_config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        shutil.copyfile(self.metrics_path, out / "metrics.jsonl")
        metrics = self.final_metrics(dev)
        extra = {
            "trainSamples": len(datasets.train),
            "validationSamples": len(datasets.validation),
            "totalSteps": self.progress.total_steps,
        }
        (out / "README.md").write_text(artifacts.model_card(config_json, metrics, extra))
        artifacts.plot_losses(self.progress.events, out / "loss.png")
        manifest = artifacts.publish(out, self.store)
        uri = self.store.uri
        summary = events.Summary(
            step=self.progress.step,
            total_steps=self.progress.total_steps,
            epoch=round(self.progress.epoch, 4),
            metrics=events.Metrics.model_validate(metrics),
            artifacts=events.Artifacts(
                location=uri,
                adapter=f"{uri}/adapter" if adapter_dir else None,
                merged=f"{uri}/{merged_dir.name}" if merged_dir else None,
                manifest=f"{uri}/{artifacts.MANIFEST}",
                total_bytes=manifest["totalBytes"],
                files=len(manifest["files"]),
            ),
        )
        return summary.model_dump(by_alias=True, exclude={"error", "exit_code"})

    def final_metrics(self, dev: torch.device) -> dict[str, Any]:
        p = self.progress
        return events.Metrics(
            train_loss=p.train_loss,
            eval_loss=p.eval_loss,
            perplexity=perplexity(p.eval_loss),
            learning_rate=p.learning_rate,
            tokens_per_second=round(p.tokens_per_second, 1) if p.tokens_per_second else None,
            peak_memory_bytes=peak_memory_bytes(dev),
        ).model_dump(by_alias=True)


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped so that JSON stays finite."""
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


def generate_predictions(
    model: Any, tokenizer: Any, config: TrainerConfig, examples: list[data.Example], dev: torch.device,
    synced: bool = False,
) -> list[dict[str, str]]:
    """Greedy answers to a few validation prompts, next to the expected answers.

    ``synced``: every rank generates the same answers and runs forward passes until the longest
    is done (a sharded model's forward passes are collective)."""
    if not examples:
        return []
    chat = data.use_chat_template(config.dataset, tokenizer)
    results = []
    with torch.no_grad():
        for example in examples:
            ids = data.prompt_ids(example, config.dataset, tokenizer, chat)[-config.dataset.max_length :]
            input_ids = torch.tensor([ids], device=dev)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=min(64, max(8, config.dataset.max_length - len(ids))),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                synced_gpus=synced,
            )
            text = tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
            results.append({"prompt": example.prompt, "expected": example.answer, "generated": text.strip()})
    return results


def merge_adapter(
    model_path: Path, adapter_dir: Path, out: Path, config: TrainerConfig, precision: model_lib.Precision
) -> None:
    """Merge the adapter into the unquantized backbone (loaded afresh on the CPU) and save it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if config.quantization == "int4":  # config.py rejects this; keep the rule in one place
        raise InvalidInput("output.mergeAdapter is not supported with quantization int4")
    log.info("merging the adapter into %s (%s)", config.model.source, precision.dtype)
    base = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=precision.dtype, trust_remote_code=config.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
