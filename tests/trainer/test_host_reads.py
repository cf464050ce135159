"""The training loop keeps the running loss on the device: the trainer's own code makes no host read
(a GPU sync) per step or micro-batch, only at logging, evaluation and checkpoint steps. (Reads made
inside torch's optimizers, of CPU step counters, and inside transformers' mask code are theirs.)"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.report import Reporter
from kubetune_trainer.train import Trainer
from tests.support.trainer import make_config

pytestmark = pytest.mark.trainer
READS = ("item", "tolist", "__float__", "__int__", "__bool__")


class HostReads:
    """Counts the trainer's own tensor → host conversions (each one waits for the device) while it
    is active: those called directly from kubetune_trainer's code."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> HostReads:
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._counting(method))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)

    def _counting(self, method: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if "kubetune_trainer" in sys._getframe(1).f_code.co_filename:
                self.count += 1
            return method(tensor, *args, **kwargs)
        return read


@pytest.fixture
def loop_reads(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Host reads inside Trainer.loop for a run of ``steps`` steps that logs, evaluates and
    checkpoints only at its end."""
    loop = Trainer.loop

    def run(steps: int) -> int:
        training = {"maxSteps": steps, "batchSize": 2, "gradientAccumulation": 4, "logEverySteps": 1000,
                    "evalEverySteps": 1000, "checkpointEverySteps": 1000}
        config = make_config(assets, tmp_path / f"out-{steps}", training=training)
        counter = HostReads()

        def counted_loop(self: Trainer, *args: Any, **kwargs: Any) -> Any:
            with counter:
                return loop(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "loop", counted_loop)
        Trainer(config, Reporter(tmp_path / f"metrics-{steps}.jsonl")).run()
        return counter.count

    yield run


def test_steps_between_logs_read_nothing_back_from_the_device(loop_reads: Any) -> None:
    short, long = loop_reads(2), loop_reads(6)
    assert short > 0  # the final log, evaluation and checkpoint do read
    assert long == short, f"{long - short} host reads in 4 more steps of 4 micro-batches each"
