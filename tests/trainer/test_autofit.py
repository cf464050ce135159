"""batchSize / gradientCheckpointing auto on the CPU: an out-of-memory halves the micro-batch, keeps the
global batch, loses no data; checkpointing follows the device's memory."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_contract.config import TrainerConfig
from kubetune_contract.estimate import RunSettings, estimate, read_shape
from kubetune_trainer.errors import OutOfMemory
from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer, halve_micro_batch
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer


class CudaOutOfMemoryTestDouble(torch.cuda.OutOfMemoryError):
    """TEST DOUBLE for the CUDA allocator's out-of-memory error: these tests run on the CPU, where no
    real CUDA out-of-memory can happen."""


class RecordingTrainer(Trainer):
    """The real trainer; its micro-steps record which samples each optimizer step trained on, and
    fail like a CUDA allocation when a micro-batch holds more than ``fits`` samples."""

    def __init__(self, *args: Any, fits: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fits = fits
        self.seen: dict[int, Counter[int]] = {}
        self.failures: list[int] = []

    def micro_step(self, engine: Any, samples: Any, chosen: list[int], *args: Any, **kwargs: Any) -> torch.Tensor:
        step = self.progress.step + 1
        if self.fits is not None and len(chosen) > self.fits:
            self.failures.append(len(chosen))
            # A partial step's samples do not count: the step is repeated from its start.
            self.seen.pop(step, None)
            raise CudaOutOfMemoryTestDouble(f"CUDA out of memory (test double): micro-batch of {len(chosen)}")
        loss = super().micro_step(engine, samples, chosen, *args, **kwargs)
        self.seen.setdefault(step, Counter()).update(chosen)
        return loss


def auto_config(assets: Path, out: Path, **training: Any) -> TrainerConfig:
    return make_config(assets, out, training={"maxSteps": 12, "batchSize": "auto", "globalBatchSize": 16,
                                              "evalEverySteps": 6, "checkpointEverySteps": 6, **training})


def run(assets: Path, out: Path, fits: int | None, **training: Any) -> RecordingTrainer:
    trainer = RecordingTrainer(auto_config(assets, out, **training), Reporter(out / "metrics.jsonl"), fits=fits)
    trainer.run()
    return trainer


def test_out_of_memory_halves_the_micro_batch_and_trains_on_the_same_samples(
        assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = run(assets, tmp_path / "plain", fits=None, batchSize=8, gradientAccumulation=2, globalBatchSize=None)
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.train"):
        fitted = run(assets, tmp_path / "fitted", fits=3)

    # On the CPU, auto starts with the whole global batch in one micro-batch.
    assert fitted.failures == [16, 8, 4], "16, 8 and 4 do not fit; 2 does"
    assert fitted.micro_batch_size == 2
    assert fitted.progress.step == plain.progress.step == 12
    # Every step trained on exactly the samples of the uninterrupted run, each once.
    assert fitted.seen == plain.seen
    assert all(sum(c.values()) == 16 and max(c.values()) == 1 for c in fitted.seen.values())
    # The same global batch and loss weighting: the same adapter, up to the order of float sums.
    assert fitted.progress.train_loss == pytest.approx(plain.progress.train_loss, rel=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "out of memory in step 1" in r.getMessage()]
    assert len(warnings) == 3
    assert "micro-batch 2, gradient accumulation 8" in warnings[2] and "global batch stays 16" in warnings[2]


def test_batch_size_auto_on_the_cpu_is_one_micro_batch_per_step(assets: Path, tmp_path: Path) -> None:
    trainer = run(assets, tmp_path / "out", fits=None, globalBatchSize=12)
    assert trainer.micro_batch_size == 12 and not trainer.gradient_checkpointing
    sizes = [sum(c.values()) for c in trainer.seen.values()]
    assert max(sizes) == 12 and all(0 < size <= 12 for size in sizes)  # an epoch's last step may be smaller


def test_with_an_integer_batch_size_an_out_of_memory_ends_the_run(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(OutOfMemory, match=r"training\.batchSize: auto with training\.globalBatchSize"):
        run(assets, tmp_path / "out", fits=3, batchSize=8, gradientAccumulation=2, globalBatchSize=None)


def test_an_out_of_memory_at_micro_batch_one_ends_the_run(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(OutOfMemory, match="out of accelerator memory during step 1"):
        run(assets, tmp_path / "out", fits=0)


@pytest.mark.parametrize(("batch", "accumulation", "expected"), [(8, 2, (4, 4)), (3, 1, (1, 3)), (5, 2, (2, 5)),
                                                                 (1, 4, (1, 4))])
def test_halving_keeps_the_global_batch(batch: int, accumulation: int, expected: tuple[int, int]) -> None:
    smaller, more = halve_micro_batch(batch, accumulation)
    assert (smaller, more) == expected
    assert smaller * more >= batch * accumulation


class DeviceMemoryTestDouble:
    """TEST DOUBLE for torch.cuda.mem_get_info: a device with ``free`` bytes free, so that the check at
    start runs on the CPU as on a GPU."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self) -> tuple[int, int]:
        return self.free, 2 * self.free


@pytest.mark.parametrize("needs_checkpointing", [True, False])
def test_gradient_checkpointing_auto_follows_the_device_memory(assets: Path, tmp_path: Path,
                                                               needs_checkpointing: bool) -> None:
    config = auto_config(assets, tmp_path / "out", batchSize=4, gradientAccumulation=2, globalBatchSize=None,
                         gradientCheckpointing="auto", maxSteps=2)
    shape = read_shape(Path(config.model.source))
    settings = RunSettings.from_run(config, micro_batch=4)
    without = estimate(shape, RunSettings.from_run(config, micro_batch=4, gradient_checkpointing=False)).peak
    assert estimate(shape, settings).peak < without
    # The device's free memory puts 85% of it just below, or just above, the peak without checkpointing.
    free = int(without / 0.85) + (-1 if needs_checkpointing else 1)
    trainer = RecordingTrainer(config, Reporter(tmp_path / "out" / "metrics.jsonl"))
    trainer.device_memory = DeviceMemoryTestDouble(free)
    result = trainer.run()
    assert trainer.gradient_checkpointing is needs_checkpointing
    assert result.model.base_model.model.is_gradient_checkpointing is needs_checkpointing
    assert trainer.micro_batch_size == 4 and trainer.progress.step == 2


class FailingOnceMidStep(Trainer):
    """The real trainer; the third micro-batch of step 1 fails once like a CUDA allocation, after two
    have trained (and counted their pairs)."""

    calls = 0

    def micro_step(self, engine: Any, samples: Any, chosen: list[int], *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.progress.step == 0 and len(chosen) > 2:
            raise CudaOutOfMemoryTestDouble(f"CUDA out of memory (test double): micro-batch of {len(chosen)}")
        if self.progress.step == 0 and self.calls == 5:  # 8 and 4 failed, two micro-batches of 2 trained
            raise CudaOutOfMemoryTestDouble("CUDA out of memory (test double): third micro-batch")
        return super().micro_step(engine, samples, chosen, *args, **kwargs)


def test_a_repeated_preference_step_counts_its_pairs_once(assets: Path, tmp_path: Path) -> None:
    from devcluster import tiny

    tiny.write_rows(tmp_path / "pairs.jsonl", tiny.make_preference_rows(40, seed=0))
    config = make_config(assets, tmp_path / "out", dataset={"train": str(tmp_path / "pairs.jsonl"), "validation": None},
                         training={"method": "dpo", "maxSteps": 2, "batchSize": "auto", "globalBatchSize": 8,
                                   "evalEverySteps": 2, "checkpointEverySteps": 2})
    trainer = FailingOnceMidStep(config, Reporter(tmp_path / "metrics.jsonl"))
    trainer.run()
    assert trainer.micro_batch_size == 1
    first = trainer.progress.events[1]
    assert first["step"] == 1 and first["rewards"]["pairs"] == 8
