"""The training run: data → model → a resumable, deterministic training loop → published outputs.

A hand-written loop rather than the HF Trainer: the data position is a pure function of the step
(seeded order per epoch), so a checkpoint only needs the step, the trained weights, the optimizer
and scheduler states and the RNG states; a resumed run continues exactly where the checkpoint was.

The Trainer runs the loop; one step's pieces are in steps.py, the checkpoints (format, store, resume)
in checkpoints.py, the validation loss and predictions in evaluation.py, and what is published at
the end in outputs.py.
"""

from __future__ import annotations

import logging
import math
import random
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

from kubetune_contract import events
from kubetune_contract.config import TrainerConfig
from kubetune_contract.estimate import Estimate

from . import artifacts, data, data_stats, distributed, evaluation, lineage, oci, outputs, sources
from . import model as model_lib
from . import preference as preference_lib
from .checkpoints import CheckpointStore, LoadedCheckpoint, apply_states, save_local
from .errors import InvalidInput, OutOfMemory, Terminated
from .outputs import FinalModel
from .report import Reporter
from .steps import (
    OUT_OF_MEMORY_ERRORS,
    DataOrder,
    DeviceMemory,
    check_device_memory,
    halve_micro_batch,
    make_optimizer,
    micro_step,
    out_of_memory_message,
    peak_memory_bytes,
    step_seed,
    target_tokens,
    total_steps,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
"""While steps advance, the operator hears from the run at least this often (training.stallTimeoutSeconds
is checked against it, so it stays well above)."""



@dataclass
class RunState:
    """Where the run is, and the progress events so far (kubetune_contract.events.ProgressReport as
    JSON); also read by ``__main__`` to describe a failure."""

    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    rewards: events.Rewards | None = None
    """Preference methods: the training pairs' rewards of the last report."""
    eval_rewards: events.Rewards | None = None
    """Preference methods: the validation pairs' rewards of the last evaluation."""
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    summary: dict[str, Any]
    model: Any
    tokenizer: Any


class Trainer:
    """One run of a :class:`TrainerConfig`."""

    def __init__(
        self, config: TrainerConfig, reporter: Reporter | None = None, world: distributed.World | None = None
    ) -> None:
        self.config = config
        self.world = world if world is not None else distributed.world_from_env()
        self.progress = RunState()
        self.started_at = events.now()
        """When this attempt started (the lineage's startedAt)."""
        self.work = Path(tempfile.mkdtemp(prefix="kubetune-run-"))
        self.reporter = reporter or Reporter()
        if self.reporter.metrics_path is None:
            self.reporter.metrics_path = self.work / "metrics.jsonl"
        self.metrics_path: Path = self.reporter.metrics_path
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")
        self.store: artifacts.Store | None = None
        self.last_told = time.monotonic()
        """When the operator last heard from this run (a progress report or an activity)."""
        self.last_eta: float | None = None
        self.registry: oci.Registry | None = None
        """output.oci's registry (rank 0): checked before the model loads, pushed to after publishing."""
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
        self.checkpoints: CheckpointStore | None = None
        """The run's checkpoints in the store (opened with it)."""
        self.after_step: Callable[[int, Any, Any], None] | None = None  # (step, model, optimizer): census.py
        self.dataset: events.DatasetStats | None = None
        """The data's statistics (describe_data); sent with the first progress report, and again once
        the first steps give the time estimate."""
        self.dataset_sent = self.estimated = False
        self.samples_text = ""
        """samples.txt: rendered samples, the masked part marked."""
        self.sharded = False
        """The model is sharded over the ranks (distribution.strategy fsdp): its forward passes, and
        gathering its weights, are collective, so every rank takes part in them."""
        self.preference: preference_lib.Preference | None = None
        """The preference method's steps (training.method dpo, ipo, orpo, simpo)."""
        self.val_pairs: list[data.Pair] = []
        """The validation pairs of a preference method."""

    def close(self) -> None:
        """Leave the process group and remove the local working directory (staged outputs and
        checkpoints). The caller closes once it has reported how the run ended."""
        distributed.shutdown()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- setup --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Train and publish; on SIGTERM, checkpoint (when in the loop) and raise Terminated.

        An accelerator out-of-memory error becomes :class:`OutOfMemory` with settings to change.
        Rank 0's log is also written to trainer.log in the work directory while it runs: published with
        the outputs (`kubetune logs` reads it once the pods are gone).
        """
        copy = logging.FileHandler(self.work / "trainer.log", encoding="utf-8") if self.world.is_main else None
        if copy is not None:
            copy.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            copy.setLevel(logging.INFO)
            logging.getLogger().addHandler(copy)
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
        finally:
            if copy is not None:
                logging.getLogger().removeHandler(copy)
                copy.close()

    def out_of_memory_message(self, err: BaseException) -> str:
        step = self.progress.step
        where = f"during step {step + 1}" if self.in_loop else f"outside the training loop (at step {step})"
        return out_of_memory_message(self.config, err, where, self.micro_batch_size, self.gradient_checkpointing,
                                     self.memory_estimate)

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
        self.tell("preparing")
        self.store = artifacts.open_store(cfg.output.location, cfg.run_name, cfg.storage)
        self.checkpoints = CheckpointStore(self.store, cfg, self.work)
        # The first process of each machine checks the data and fills the download cache; the others
        # then find it there. When it fails, every rank fails with its reason (World.agree).
        if world.local_rank == 0:
            with world.fail_together():
                datasets, model_path, tokenizer_path = self._prepare()
        else:
            world.agree(None)
            datasets, model_path, tokenizer_path = self._prepare()
        tokenizer = model_lib.load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
        counted: data.Tokenized[Any]
        if datasets.train_pairs is not None and datasets.validation_pairs is not None:
            counted = data.tokenize_pairs(datasets.train_pairs, cfg.dataset, tokenizer)
            self.val_pairs = data.tokenize_pairs(datasets.validation_pairs, cfg.dataset, tokenizer).samples
            # The validation loss and perplexity are the chosen answers' (what evaluation generates).
            val_samples = [p.chosen for p in self.val_pairs]
        else:
            counted = data.tokenize_counted(datasets.train, cfg.dataset, tokenizer)
            val_samples = data.tokenize(datasets.validation, cfg.dataset, tokenizer)
        train_samples: list[Any] = counted.samples
        if cfg.training.packing:
            train_samples = data.pack(train_samples, cfg.dataset.max_length)
            log.info("packing: %d blocks of up to %d tokens", len(train_samples), cfg.dataset.max_length)
        self.describe_data(counted, train_samples, len(val_samples), tokenizer, datasets.skipped)

        dev = world.device()
        precision = model_lib.resolve_precision(cfg.training.precision, dev)
        torch.manual_seed(cfg.training.seed)  # adapter initialisation, the same on every rank
        model = model_lib.load_model(model_path, cfg, precision, dev, self.gradient_checkpointing)
        if cfg.preference_tuning:
            self.preference = preference_lib.Preference(cfg.training.method, cfg.preference_spec, model, dev,
                                                        adapter=cfg.lora.enabled)
        self.loop(model, tokenizer, train_samples, val_samples, dev, precision)
        final = self.final_model(model, tokenizer, datasets, val_samples, dev, precision)
        # Over several pods, a pod whose processes exit 0 completes its index of the Indexed Job for
        # good, so no rank ends before rank 0 has published; when rank 0 fails, every rank fails.
        if not world.is_main:
            world.agree(None)
            return RunResult({}, model, tokenizer)
        with world.fail_together():
            summary = self.finish(model, tokenizer, model_path, datasets, final, dev, precision)
        return RunResult(summary, model, tokenizer)

    def describe_data(self, counted: data.Tokenized[Any], trained: list[Any], validation_samples: int,
                      tokenizer: Any, skipped: int = 0) -> None:
        """The data's statistics (for the first progress report, the logs and the model card) and two
        rendered samples (samples.txt; a preference run's first pair), before the model loads."""
        self.dataset = data_stats.describe(counted, trained, validation_samples, self.config, self.world.world_size,
                                           skipped)
        first = counted.samples[:2]
        shown = [first[0].chosen, first[0].rejected] if first and isinstance(first[0], data.Pair) else first
        self.samples_text = data.render_samples(shown, tokenizer)
        log.info("data: %s", "; ".join(data_stats.lines(self.dataset, self.config.dataset.max_length)))

    def _prepare(self) -> tuple[data.Datasets, Path, Path]:
        """Read and check the data, fit the batch to the device, and resolve the model and tokenizer
        to local directories (downloading them into the cache)."""
        cfg = self.config
        datasets = data.load_datasets(cfg)
        fit = check_device_memory(cfg, self.world, self.world.device(), self.device_memory)
        self.memory_estimate, self.micro_batch_size = fit.estimate, fit.micro_batch
        self.gradient_checkpointing = fit.gradient_checkpointing
        if cfg.output.oci is not None and self.world.is_main and self.store is not None:
            # The registry answers and the tag is free (or this run's own) before anything is downloaded.
            self.registry = oci.Registry(cfg.output.oci.repository, cfg.output.oci.insecure, oci.registry_auth())
            self.registry.check_tag(cfg.output.oci.tag or "latest", self.store.uri, cfg.output.oci.overwrite)
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
        train_samples: list[Any],
        val_samples: list[data.Sample],
        dev: torch.device,
        precision: model_lib.Precision,
    ) -> None:
        """Train ``train_samples`` (samples, or a preference method's pairs) from the newest checkpoint."""
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

        if self.preference is not None:
            # A full fine-tune's reference: the weights as loaded, before a checkpoint is applied.
            self.preference.precompute(engine, {"train": train_samples, "validation": self.val_pairs}, pad_id, dev,
                                       precision, batch_size)
        start = self.resume(model, optimizer, scheduler, scaler)
        if start == 0:
            self.report(0, dev, None, self.evaluate(model, val_samples, pad_id, dev, precision))

        model.train()
        self.in_loop = True
        self.tell("training")
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
            before = self.preference.window.saved() if self.preference is not None else None
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
                if self.preference is not None and before is not None:
                    self.preference.window.restore(before)  # the partial step's pairs do not count
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
            window_tokens += sum(train_samples[i].tokens for i in step_samples)
            if tc.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if self.after_step is not None:
                self.after_step(step, model, optimizer)

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
                if self.preference is not None:
                    self.progress.rewards = self.preference.window.rewards(world, dev)
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
                if step != steps:
                    self.tell("training")
            elif not do_log and time.monotonic() - self.last_told >= HEARTBEAT_S:
                self.tell("training")  # steps advance, slower than logEverySteps reports them
            if stop:
                raise Terminated(f"stopped by SIGTERM at step {step}; a checkpoint of step {step} was written")
            if do_log or do_checkpoint:
                compute_start = time.perf_counter()
        self.in_loop = False
        if total_tokens:
            self.progress.tokens_per_second = total_tokens / max(total_time, 1e-9)
            log.info("trained %d steps in %.1fs (%.1fs of compute): %.0f tokens/s", steps - start,
                     time.perf_counter() - loop_start, total_time, self.progress.tokens_per_second)

    def micro_step(self, engine: Any, samples: list[Any], chosen: list[int], pad_id: int,
                   dev: torch.device, precision: model_lib.Precision, scaler: Any, scale: float, weight: float,
                   no_sync: bool) -> torch.Tensor:
        if self.preference is not None:
            return self.preference.micro_step(engine, samples, chosen, pad_id, dev, precision, scaler, scale, weight,
                                              no_sync)
        return micro_step(engine, data.collate([samples[i] for i in chosen], pad_id), dev, precision, scaler, scale,
                          weight, no_sync)

    def evaluate(
        self, model: Any, samples: list[data.Sample], pad_id: int, dev: torch.device, precision: model_lib.Precision
    ) -> float:
        """Mean loss per answer token over the validation samples (evaluation.eval_loss); for a
        preference method also the validation pairs' losses and rewards."""
        self.tell("evaluating")
        self.progress.eval_loss = evaluation.eval_loss(model, samples, pad_id, dev, precision, self.world,
                                                       self.micro_batch_size, sharded=self.sharded)
        if self.preference is not None:
            self.progress.eval_rewards = self.preference.evaluate(model, self.val_pairs, pad_id, dev, precision,
                                                                  self.world, self.micro_batch_size,
                                                                  sharded=self.sharded)
        return self.progress.eval_loss

    def tell(self, activity: events.Activity) -> None:
        """A light progress report (rank 0; not in metrics.jsonl): the current step and what the run
        is doing now. The operator's stall check counts only time spent training without a report."""
        self.last_told = time.monotonic()
        if not self.world.is_main:
            return
        p = self.progress
        report = events.ProgressReport(type="activity", step=p.step, total_steps=p.total_steps,
                                       epoch=round(p.epoch, 4), activity=activity, sent_at=round(time.time(), 3),
                                       eta_seconds=round(self.last_eta, 1) if self.last_eta is not None else None)
        self.reporter.emit(events.event_json(report), record=False)

    def report(self, step: int, dev: torch.device, eta: float | None, eval_loss: float | None) -> None:
        self.last_told, self.last_eta = time.monotonic(), eta
        p = self.progress
        report = events.ProgressReport(
            activity="training",
            sent_at=round(time.time(), 3),
            step=step,
            total_steps=p.total_steps,
            epoch=round(p.epoch, 4),
            train_loss=p.train_loss if step else None,
            learning_rate=p.learning_rate,
            eval_loss=eval_loss,
            perplexity=evaluation.perplexity(eval_loss),
            tokens_per_second=round(p.tokens_per_second, 1) if p.tokens_per_second and step else None,
            eta_seconds=round(eta, 1) if eta is not None else None,
            peak_memory_bytes=peak_memory_bytes(dev),
            rewards=p.rewards if step else None,
            eval_rewards=p.eval_rewards if eval_loss is not None else None,
            dataset=self.dataset_update(step, dev),
        )
        event = events.event_json(report)
        p.events.append(event)
        self.reporter.emit(event)

    def dataset_update(self, step: int, dev: torch.device) -> events.DatasetStats | None:
        """status.dataset for this report: with the first report, and once more with the estimate
        from the tokens/s of the first steps (from step 5, or the last step of a shorter run)."""
        d, p = self.dataset, self.progress
        if d is None:
            return None
        first = min(5, p.total_steps or 5)
        if step >= first and p.tokens_per_second and not self.estimated and d.total_tokens is not None:
            self.estimated = True
            d.estimated_seconds = round(d.total_tokens / p.tokens_per_second, 1)
            gpus = self.world.world_size if dev.type == "cuda" else 0
            d.gpu_hours = round(d.estimated_seconds * gpus / 3600, 4)
            log.info("estimate from the first %d steps: %.0f tokens/s, %.1fs of training, %.3f GPU-hours", step,
                     p.tokens_per_second, d.estimated_seconds, d.gpu_hours)
            return d
        if not self.dataset_sent:
            self.dataset_sent = True
            return d
        return None

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, model: Any, optimizer: Any, scheduler: Any, scaler: Any, step: int) -> None:
        """Rank 0 writes a checkpoint to the store; its marker goes last, then old checkpoints are
        pruned. Every rank calls it: a sharded model's weights and optimizer state are gathered first.

        The files are the same whatever the strategy: whole trained weights, and the optimizer state
        dict of an unsharded optimizer."""
        self.tell("checkpointing")
        trained: dict[str, torch.Tensor] = {}
        optimizer_state: dict[str, Any] = {}
        if self.sharded:
            trained = distributed.gather_trainable_state(model)
            optimizer_state = distributed.gather_optimizer_state(model, optimizer)
        elif self.world.is_main:
            trained, optimizer_state = model_lib.trainable_state(model), optimizer.state_dict()
        if not self.world.is_main:
            return
        assert self.checkpoints is not None
        local = self.work / "checkpoint"
        save_local(local, trained, optimizer_state, scheduler, scaler, self.metrics_path, step, self.progress.epoch)
        location = self.checkpoints.write(local, step)
        log.info("checkpoint at step %d: %s", step, location)
        self.reporter.emit({"type": "checkpoint", "step": step, "location": location}, record=False)
        self.checkpoints.prune()

    def resume(self, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> int:
        """Load the newest valid checkpoint of this run, if any; return its step (0 when starting fresh).

        A checkpoint is only data: no file is unpickled beyond tensors and plain containers, and one
        that belongs to another run or config, or does not match its marker, is skipped with a
        warning (the next older one is tried). Every rank must choose rank 0's checkpoint; they
        agree before any is loaded (loading into a sharded model is collective).
        """
        assert self.checkpoints is not None
        loaded = self.checkpoints.newest_valid(self.progress.total_steps or 0, model, scheduler)
        step = loaded.step if loaded is not None else 0
        agreed = self.world.broadcast_int(step, self.world.device())
        if agreed != step:
            raise RuntimeError(f"rank {self.world.rank} resumes from step {step}, rank 0 from step {agreed}")
        if loaded is None:
            if self.checkpoints.rejected:
                log.warning("no usable checkpoint in %s; starting from step 0", self.checkpoints.uri)
            return 0
        self.apply_checkpoint(loaded, model, optimizer, scheduler, scaler)
        log.info("resuming from step %d (%s/step-%d)", step, self.checkpoints.uri, step)
        return step

    def apply_checkpoint(
        self, loaded: LoadedCheckpoint, model: Any, optimizer: Any, scheduler: Any, scaler: Any
    ) -> None:
        apply_states(loaded, model, optimizer, scheduler, scaler, sharded=self.sharded)
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
            self.progress.rewards = report.rewards or self.progress.rewards
            self.progress.eval_rewards = report.eval_rewards or self.progress.eval_rewards

    # -- outputs ------------------------------------------------------------------------------

    def final_model(self, model: Any, tokenizer: Any, datasets: data.Datasets, val_samples: list[data.Sample],
                    dev: torch.device, precision: model_lib.Precision) -> FinalModel:
        """The evaluation (evaluation.py) and, for a sharded model, its trained weights gathered whole.

        Every rank takes part: the answers are generated batch by batch on the ranks in turn (a
        sharded model's, on every rank in step), and the gather is collective; rank 0 keeps them."""
        self.tell("evaluating")
        model.eval()
        pad_id = tokenizer.pad_token_id
        result = evaluation.evaluate(
            model, tokenizer, self.config, datasets.validation, self.progress.eval_loss,
            lambda: evaluation.eval_loss(model, val_samples, pad_id, dev, precision, self.world,
                                         self.micro_batch_size, sharded=self.sharded),
            dev, self.world, sharded=self.sharded, judge_on_this_rank=self.world.is_main,
        )
        state = distributed.gather_model_state(model) if self.sharded else None
        return FinalModel(result, state)

    def finish(
        self,
        model: Any,
        tokenizer: Any,
        model_path: Path,
        datasets: data.Datasets,
        final: FinalModel,
        dev: torch.device,
        precision: model_lib.Precision,
    ) -> dict[str, Any]:
        """Save the outputs to a staging directory, publish them, and return the summary."""
        assert self.store is not None
        self.tell("publishing")
        p = self.progress
        staged = outputs.Staged(self.work / "outputs", self.metrics_path, p.events, len(datasets.train),
                                len(datasets.validation), self.dataset, self.samples_text,
                                lineage.lineage(self.config, model_path, datasets.files, self.started_at),
                                datasets.validation, self.work / "trainer.log")
        return outputs.publish(self.config, self.store, staged, model, tokenizer, model_path, final, precision,
                               self.final_metrics(dev), p.step, p.total_steps, p.epoch, self.registry)

    def final_metrics(self, dev: torch.device) -> dict[str, Any]:
        p = self.progress
        return events.Metrics(
            train_loss=p.train_loss,
            eval_loss=p.eval_loss,
            perplexity=evaluation.perplexity(p.eval_loss),
            learning_rate=p.learning_rate,
            tokens_per_second=round(p.tokens_per_second, 1) if p.tokens_per_second else None,
            peak_memory_bytes=peak_memory_bytes(dev),
            rewards=p.rewards,
            eval_rewards=p.eval_rewards,
        ).model_dump(by_alias=True, exclude={name for name in ("rewards", "eval_rewards") if getattr(p, name) is None})
