"""Statistics of the training data, before the model loads: how many samples and tokens, how many
were truncated, how many steps, and (once the first steps have run) how long it will take.

The trainer reports them with its first progress report (status.dataset), logs them and puts them in
the model card; ``kubetune estimate --data FILE`` prints the same for a file on this machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kubetune_contract.config import RunSections
from kubetune_contract.events import DatasetStats

from . import data, sources
from . import model as model_lib
from .steps import total_steps


def describe(counted: data.Tokenized[Any], trained: list[Any], validation_samples: int, run: RunSections,
             world_size: int, skipped: int = 0) -> DatasetStats:
    """The statistics of tokenized training data. ``trained``: the samples as they train (packed
    blocks with training.packing; a preference method's pairs), which the steps count. A pair's
    length is its prompt with its longer answer; its tokens per epoch count both sequences."""
    per_epoch = math.ceil(len(trained) / run.training.global_batch(world_size))
    steps = total_steps(run, len(trained), world_size)
    lengths = sorted(counted.lengths)
    epoch_tokens = sum(s.tokens for s in trained)
    return DatasetStats(
        samples=len(counted.samples), validation_samples=validation_samples,
        tokens_p50=lengths[(len(lengths) - 1) // 2], tokens_p95=lengths[math.ceil(0.95 * len(lengths)) - 1],
        tokens_max=lengths[-1], truncated=counted.truncated, dropped=counted.dropped, skipped=skipped or None,
        epoch_tokens=epoch_tokens, total_tokens=round(epoch_tokens * steps / max(per_epoch, 1)),
        steps_per_epoch=per_epoch, total_steps=steps,
    )


def of_file(run: RunSections, path: Path, processes: int) -> DatasetStats:
    """The statistics of a local data file for ``run``: its tokenizer (downloaded into the cache when
    remote), its template and maxLength, its batch over ``processes``."""
    source = run.model.tokenizer or run.model.source
    tokenizer = model_lib.load_tokenizer(sources.resolve(source, run.storage, run.model.revision, directory=True),
                                         run.model.trust_remote_code)
    if run.preference_tuning:
        pairs = data.load_pairs(path, run.dataset)
        paired = data.tokenize_pairs(pairs.examples, run.dataset, tokenizer)
        return describe(paired, paired.samples, 0, run, processes, pairs.skipped)
    counted = data.tokenize_counted(data.load_examples(path, run.dataset), run.dataset, tokenizer)
    trained = data.pack(counted.samples, run.dataset.max_length) if run.training.packing else counted.samples
    return describe(counted, trained, 0, run, processes)


def lines(stats: DatasetStats, max_length: int) -> list[str]:
    """The statistics as people read them (the trainer's log, `kubetune estimate --data`)."""
    out = [
        f"samples: {stats.samples} (validation {stats.validation_samples})",
        f"tokens per sample: p50 {stats.tokens_p50}, p95 {stats.tokens_p95}, max {stats.tokens_max}",
        f"truncated to maxLength {max_length}: {stats.truncated}; dropped (no answer token left): {stats.dropped}"
        + (f"; skipped (equal or empty answers): {stats.skipped}" if stats.skipped else ""),
        f"tokens per epoch: {stats.epoch_tokens}; steps per epoch: {stats.steps_per_epoch}",
        f"training: {stats.total_steps} steps, {stats.total_tokens} tokens",
    ]
    if stats.estimated_seconds is not None:
        out.append(f"estimated: {stats.estimated_seconds}s of training, {stats.gpu_hours} GPU-hours")
    return out
