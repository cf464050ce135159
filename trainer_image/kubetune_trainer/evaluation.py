"""Evaluation of the model being trained: the validation loss (split across ranks), perplexity, and
greedy answers to validation prompts next to the expected ones."""

from __future__ import annotations

import math
from typing import Any

import torch

from kubetune_contract.config import TrainerConfig

from . import data, distributed
from . import model as model_lib
from .steps import token_loss_sum

PREDICTION_SAMPLES = 4


def eval_loss(model: Any, samples: list[data.Sample], pad_id: int, dev: torch.device, precision: model_lib.Precision,
              world: distributed.World, batch_size: int, *, sharded: bool) -> float:
    """Mean loss per answer token over the validation samples; each rank takes every N-th batch.
    ``sharded``: each forward pass is collective, so every rank runs as many passes as the rank
    with the most batches, the extra ones on a batch whose loss is not counted."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    starts = range(0, len(samples), batch_size)
    mine: list[int | None] = list(starts[world.rank :: world.world_size])
    if sharded:
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
    return loss_sum / max(count_sum, 1)


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

