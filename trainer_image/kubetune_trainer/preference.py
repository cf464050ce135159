"""Preference tuning (training.method dpo, ipo, orpo, simpo): the losses and rewards of pairs of
answers, and where the reference log-probabilities come from.

A pair's chosen and rejected sequences go through the model in one batch (the chosen ones first);
a sequence's log-probability is the sum over its answer tokens. dpo and ipo compare with the
reference model, the backbone before training: for a LoRA run, the backbone with the adapter
disabled (peft's ``disable_adapter()``, no second copy of the weights), in the same step; for a full
fine-tune, a pass over every pair with the weights as loaded, before the first step (and before a
checkpoint is applied on resume), kept as two numbers per pair. orpo and simpo need no reference.

Each pair's loss weighs the same in a step (a step's loss is the mean over its pairs, whatever the
split into micro-batches and processes). The formulas follow the papers as TRL implements them
(tests/trainer/test_preference.py checks them against TRL): dpo the sigmoid loss with optional label
smoothing (conservative DPO); ipo the squared loss on the log-ratios averaged per token; simpo the
sigmoid loss on the mean log-probabilities per token less the margin gamma / beta; orpo the
chosen answer's mean loss per token less lambda x log sigmoid of the log odds ratio (TRL averages
that first term over the tokens of a batch rather than per pair).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kubetune_contract import events
from kubetune_contract.config import REFERENCE_METHODS, PreferenceSpec

from . import data, distributed
from .steps import forward_logits, token_losses


@dataclass
class Logps:
    """Per pair: the summed log-probabilities of the chosen and rejected answers, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its labelled tokens (fp32), and how many there are."""
    return -token_losses(logits, labels).sum(-1), (labels[:, 1:] != data.IGNORE_INDEX).sum(-1)


def pair_logps(logits: torch.Tensor, labels: torch.Tensor) -> Logps:
    """:func:`sequence_logps` of a batch of pairs, chosen sequences first."""
    logps, tokens = sequence_logps(logits, labels)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return Logps(chosen, rejected, chosen_tokens, rejected_tokens)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for large negative x."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class PairLosses:
    """Per pair: the loss, and the chosen and rejected rewards."""

    losses: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


def pair_losses(method: str, spec: PreferenceSpec, policy: Logps, reference: Logps | None) -> PairLosses:
    """The method's loss and rewards of each pair."""
    beta = spec.beta
    chosen_tokens, rejected_tokens = policy.chosen_tokens.clamp(min=1), policy.rejected_tokens.clamp(min=1)
    if method in REFERENCE_METHODS:
        assert reference is not None
        chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        if method == "dpo":
            x = beta * (chosen_ratio - rejected_ratio)
            losses = -F.logsigmoid(x) * (1 - spec.smoothing) - F.logsigmoid(-x) * spec.smoothing
        else:  # ipo: the log-ratios per token
            losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
        return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    chosen_mean, rejected_mean = policy.chosen / chosen_tokens, policy.rejected / rejected_tokens
    if method == "simpo":
        losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean - spec.gamma / beta))
        return PairLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())
    if method == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
        losses = -chosen_mean - spec.lam * F.logsigmoid(log_odds)
        return PairLosses(losses, spec.lam * chosen_mean.detach(), spec.lam * rejected_mean.detach())
    raise ValueError(f"unknown preference method {method!r}")


class RewardSums:
    """Running sums of a set of pairs' losses and rewards, on the device (read back only when reported)."""

    def __init__(self, dev: torch.device) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=dev)

    def add(self, out: PairLosses) -> None:
        self.sums += torch.stack([
            out.losses.detach().sum().double(), out.chosen.sum().double(), out.rejected.sum().double(),
            (out.chosen > out.rejected).sum().double(), torch.tensor(float(out.losses.numel()), device=self.sums.device,
                                                                    dtype=torch.float64),
        ])

    def saved(self) -> torch.Tensor:
        return self.sums.clone()

    def restore(self, saved: torch.Tensor) -> None:
        """Back to ``saved``: a step repeated after an out-of-memory counts its pairs once."""
        self.sums.copy_(saved)

    def rewards(self, world: distributed.World, dev: torch.device) -> events.Rewards | None:
        """The means over every rank's pairs since the last reset; None when there were none."""
        loss, chosen, rejected, correct, pairs = world.all_reduce_sum([float(v) for v in self.sums], dev)
        self.sums.zero_()
        if not pairs:
            return None
        return events.Rewards(chosen=round(chosen / pairs, 6), rejected=round(rejected / pairs, 6),
                              margin=round((chosen - rejected) / pairs, 6), accuracy=round(correct / pairs, 6),
                              loss=round(loss / pairs, 6), pairs=int(pairs))


class Preference:
    """A preference method's steps and evaluation on a run's pairs."""

    def __init__(self, method: str, spec: PreferenceSpec, model: Any, dev: torch.device, *, adapter: bool) -> None:
        """``adapter``: the model is a peft model whose adapter is trained (lora.enabled)."""
        self.method, self.spec, self.model, self.adapter = method, spec, model, adapter
        self.window = RewardSums(dev)
        self.table: dict[tuple[str, int], tuple[float, float]] | None = None
        """Precomputed reference log-probabilities (full fine-tune): (split, pair) → (chosen, rejected)."""

    @property
    def needs_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    @property
    def adapter_reference(self) -> bool:
        """The reference is the backbone with the adapter disabled (a LoRA run)."""
        return self.needs_reference and self.adapter

    @staticmethod
    def batch(pairs: list[data.Pair], pad_id: int) -> dict[str, torch.Tensor]:
        return data.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[None]:
        """No gradients, and the adapter disabled: the model computes the backbone's log-probabilities."""
        with torch.no_grad(), self.model.disable_adapter():
            yield

    def precompute(self, engine: Any, pairs: dict[str, list[data.Pair]], pad_id: int, dev: torch.device,
                   precision: Any, batch_size: int) -> None:
        """The reference log-probabilities of every pair, from the weights as they are now (a full
        fine-tune, before training and before a checkpoint is applied). Every rank computes all of
        them in the same batches, so a sharded model's collective forward passes match."""
        if not self.needs_reference or self.adapter_reference:
            return
        table: dict[tuple[str, int], tuple[float, float]] = {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for split, items in pairs.items():
                for start in range(0, len(items), batch_size):
                    chunk = items[start : start + batch_size]
                    batch = self.batch(chunk, pad_id)
                    got = pair_logps(forward_logits(engine, batch, dev, precision), batch["labels"].to(dev))
                    for k, (c, r) in enumerate(zip(got.chosen.tolist(), got.rejected.tolist(), strict=True)):
                        table[(split, start + k)] = (c, r)
        if was_training:
            self.model.train()
        self.table = table

    def reference(self, engine: Any, batch: dict[str, torch.Tensor], split: str, indices: list[int],
                  dev: torch.device, precision: Any) -> Logps | None:
        """The reference log-probabilities of a batch of pairs (None for orpo and simpo)."""
        if not self.needs_reference:
            return None
        labels = batch["labels"].to(dev)
        if self.adapter_reference:
            with self.reference_mode():
                return pair_logps(forward_logits(engine, batch, dev, precision), labels)
        assert self.table is not None, "the reference pass has not run"
        chosen, rejected = zip(*(self.table[(split, i)] for i in indices), strict=True)
        tokens = (labels[:, 1:] != data.IGNORE_INDEX).sum(-1).chunk(2)
        return Logps(torch.tensor(chosen, device=dev), torch.tensor(rejected, device=dev), *tokens)

    def micro_step(self, engine: Any, pairs: list[data.Pair], indices: list[int], pad_id: int, dev: torch.device,
                   precision: Any, scaler: Any, scale: float, weight: float, no_sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch of pairs; its detached loss sum times ``weight``.
        ``scale`` weighs each pair's loss in the step's gradient (see steps.micro_step)."""
        batch = self.batch([pairs[i] for i in indices], pad_id)
        reference = self.reference(engine, batch, "train", indices, dev, precision)
        with contextlib.ExitStack() as stack:
            if no_sync:
                stack.enter_context(engine.no_sync())
            policy = pair_logps(forward_logits(engine, batch, dev, precision), batch["labels"].to(dev))
            out = pair_losses(self.method, self.spec, policy, reference)
            loss_sum = out.losses.sum() * weight
            scaler.scale(loss_sum * scale).backward()
        if weight:
            self.window.add(out)
        return loss_sum.detach()

    def evaluate(self, engine: Any, pairs: list[data.Pair], pad_id: int, dev: torch.device, precision: Any,
                 world: distributed.World, batch_size: int, *, sharded: bool) -> events.Rewards | None:
        """The losses and rewards of the validation pairs; each rank takes every N-th batch (a
        sharded model's ranks run as many passes as the busiest, see evaluation.eval_loss)."""
        sums = RewardSums(dev)
        starts = range(0, len(pairs), batch_size)
        mine: list[int | None] = list(starts[world.rank :: world.world_size])
        if sharded:
            mine += [None] * (math.ceil(len(starts) / world.world_size) - len(mine))
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for start in mine:
                indices = list(range(start or 0, min((start or 0) + batch_size, len(pairs))))
                batch = self.batch([pairs[i] for i in indices], pad_id)
                reference = self.reference(engine, batch, "validation", indices, dev, precision)
                policy = pair_logps(forward_logits(engine, batch, dev, precision), batch["labels"].to(dev))
                if start is not None:
                    sums.add(pair_losses(self.method, self.spec, policy, reference))
        if was_training:
            self.model.train()
        return sums.rewards(world, dev)
