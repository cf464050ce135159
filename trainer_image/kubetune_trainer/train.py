"""The training run: data → model → a resumable, deterministic training loop → published outputs.

A hand-written loop rather than the HF Trainer: the data position is a pure function of the step
(seeded order per epoch), so a checkpoint only needs the step, the trained weights, the optimizer
and scheduler states and the RNG states; a resumed run continues exactly where the checkpoint was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kubetune_contract import events
from kubetune_contract.config import TrainerConfig
from kubetune_contract.estimate import Estimate

from . import artifacts, data, distributed, sources
from . import model as model_lib
from .checkpoints import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILES,
    CHECKPOINT_FORMAT,
    CHECKPOINT_MARKER,
    LoadedCheckpoint,
    RejectedCheckpoint,
    config_hash,
    parse_checkpoint,
)
from .errors import InvalidInput, OutOfMemory, Terminated
from .report import Reporter
from .steps import (
    DataOrder,
    DeviceMemory,
    check_device_memory,
    halve_micro_batch,
    make_optimizer,
    peak_memory_bytes,
    step_seed,
    target_tokens,
    token_loss_sum,
    total_steps,
)

log = logging.getLogger(__name__)

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
