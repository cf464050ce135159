"""What one optimizer step is: the order of the data, the loss per token, the optimizer, the
micro-batch (halved on an out-of-memory) and the check of the device's memory before the weights load."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_contract.config import RunSections, TrainerConfig
from kubetune_contract.estimate import Estimate

from . import data, distributed, sources
from .errors import OutOfMemory, TrainerError

log = logging.getLogger(__name__)


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


def total_steps(config: RunSections, train_samples: int, world_size: int = 1) -> int:
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


def target_tokens(sample: data.Sample | data.Pair) -> int:
    """What a sample weighs in its step's loss: the tokens its loss is taken on (labels after the
    one-token shift, not ignored); a preference pair weighs 1 (its loss is per pair)."""
    if isinstance(sample, data.Pair):
        return 1
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


OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = (
    torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
)
"""torch.cuda.OutOfMemoryError and, where torch has it, the device-independent torch.OutOfMemoryError."""


def out_of_memory_message(config: TrainerConfig, err: BaseException, where: str, micro_batch_size: int,
                          gradient_checkpointing: bool, estimate: Estimate | None) -> str:
    """What ran out of memory, where, the estimate's split, and the settings that would fit."""
    tc = config.training
    detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    hints = [
        *([f"quantization int4 (now {config.quantization})"] if config.quantization != "int4" and config.lora.enabled
          else []),
        f"a smaller dataset.maxLength (now {config.dataset.max_length})",
        *([f"a smaller training.batchSize (now {micro_batch_size}; raise training.gradientAccumulation "
           "to keep the effective batch)"] if micro_batch_size > 1 and not tc.auto_batch else []),
        *(["training.batchSize: auto with training.globalBatchSize"]
          if not tc.auto_batch and micro_batch_size > 1 else []),
        *(["training.gradientCheckpointing: true or auto"] if not gradient_checkpointing else []),
        "or more GPUs",
    ]
    split = ""
    if estimate is not None:
        split = (f" (estimated peak {estimate.peak / 2**30:.1f} GiB per GPU: weights {estimate.weights / 2**30:.1f}, "
                 f"activations {estimate.activations / 2**30:.1f}, logits {estimate.logits / 2**30:.1f} GiB)")
    return f"out of accelerator memory {where}: {detail}{split}. To fit, try " + ", ".join(hints)


def forward_logits(engine: Any, batch: dict[str, torch.Tensor], dev: torch.device, precision: Any) -> torch.Tensor:
    """The logits of a collated batch (data.collate), under the run's autocast."""
    with torch.autocast(dev.type, dtype=precision.dtype, enabled=precision.autocast):
        return engine(  # type: ignore[no-any-return]
            input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
            **({"position_ids": batch["position_ids"].to(dev)} if "position_ids" in batch else {}),
        ).logits


def micro_step(engine: Any, batch: dict[str, torch.Tensor], dev: torch.device, precision: Any, scaler: Any,
               scale: float, weight: float, no_sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; its detached loss sum times ``weight``. ``scale``
    weighs its tokens' losses in the step's gradient; ``no_sync``: no gradient all-reduce yet (DDP)."""
    with contextlib.ExitStack() as stack:
        if no_sync:
            stack.enter_context(engine.no_sync())
        logits = forward_logits(engine, batch, dev, precision)
        loss_sum = token_loss_sum(logits, batch["labels"].to(dev)) * weight
        scaler.scale(loss_sum * scale).backward()
    return loss_sum.detach()
