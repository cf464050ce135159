"""Where training memory goes: every live tensor of a device, counted once by its storage, in the
category it belongs to.

    frozen weights <dtype>   parameters that do not train (the backbone; int8 for bitsandbytes int8)
    trainable weights        parameters that train (the LoRA adapter, or everything in a full fine-tune)
    gradients                their .grad
    optimizer state          the optimizer's per-parameter state (AdamW's moments, 8-bit states)
    quantization state       what bitsandbytes keeps beside its weights (int8 row scales, 4-bit
                             absmax and codes, a MatmulLtState's transposed or tiled copies)
    quantization outliers    the outlier columns of the last int8 matmul (indices and weight rows):
                             their size follows the data of the step, not the model
    buffers                  the model's buffers (rotary tables, ...)
    other                    everything else alive: activations saved past a step, caches (autocast,
                             bitsandbytes), the data of the step

A category that grows from one step to the next after the first is memory that leaks or
accumulates; one that exists on one side only (the trainer, or transformers.Trainer in
hack/baseline_trainer.py) is memory the other does without. `Trainer.after_step` calls `census`
after each optimizer step when asked to: ``KUBETUNE_CENSUS_FILE=<path>`` makes ``python -m
kubetune_trainer`` write the first steps' census there (rank 0), as `make gpu-check` and
tests/trainer/test_census.py do; hack/baseline_trainer.py ``--census <path>`` does the same.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STEPS = 3
"""The steps a recorder takes the census of: the first (states are created), then two alike."""
QUANTIZATION_FIELDS = ("CB", "SCB", "CBt", "SB", "SBt", "CxB", "SxB")
"""Tensors a bitsandbytes MatmulLtState or Int8Params may hold beside the int8 weights."""
OUTLIER_FIELDS = ("idx", "subB", "outlier_pool")
"""What a MatmulLtState keeps of the last step's outlier columns."""


def census(model: Any, optimizer: Any | None = None, device: torch.device | None = None) -> dict[str, int]:
    """Bytes of the live tensors on `device` (every device: None), by category (module docstring).
    Each storage counts once, in the first category that claims it (the order of the docstring)."""
    gc.collect()
    seen: set[tuple[str, int]] = set()
    found: Counter[str] = Counter()

    def add(category: str, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or (device is not None and tensor.device.type != device.type):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse, ...)
            return
        key = (str(tensor.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return
        seen.add(key)
        found[category] += storage.nbytes()

    parameters = list(model.parameters())
    for parameter in parameters:
        if parameter.requires_grad:
            add("trainable weights", parameter)
        else:
            add(f"frozen weights {str(parameter.dtype).removeprefix('torch.')}", parameter)
    for parameter in parameters:
        add("gradients", parameter.grad)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for value in state.values():
            add("optimizer state", value)
    for module in model.modules():
        holders = [getattr(module, "state", None), getattr(module, "weight", None)]
        for holder in holders:
            if holder is None:
                continue
            for name in QUANTIZATION_FIELDS:
                add("quantization state", getattr(holder, name, None))
            for name in OUTLIER_FIELDS:
                add("quantization outliers", getattr(holder, name, None))
            quant_state = getattr(holder, "quant_state", None)  # bitsandbytes Params4bit
            if quant_state is not None:
                for value in vars(quant_state).values():
                    add("quantization state", value)
    for buffer in model.buffers():
        add("buffers", buffer)
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            add("other", obj)
    return dict(found)


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Categories that hold more bytes in `after` than in `before`, and by how much."""
    return {name: after[name] - before.get(name, 0) for name in after if after[name] > before.get(name, 0)}


def recorder(path: Path, steps: int = STEPS) -> Callable[[int, Any, Any], None]:
    """An after-step hook that writes the census of the first `steps` steps to `path` as JSON
    ({"1": {category: bytes}, ...}), rewritten after each."""
    rows: dict[str, dict[str, int]] = {}

    def record(step: int, model: Any, optimizer: Any) -> None:
        if step <= steps:
            rows[str(step)] = census(model, optimizer)
            path.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")

    return record
