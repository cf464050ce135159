"""Peak GPU memory of a training process, estimated from the backbone's config.json and the run's settings.

Pure Python (no torch): the operator and ``kubetune estimate`` import it to refuse a job that cannot
fit before a GPU is held, and the trainer re-checks against the real device before loading weights.

The model is the trainer's own recipe (model.py, train.py): a decoder-only transformer (Llama
layout: attention q/k/v/o, a gated MLP gate/up/down, RMS norms, embeddings and an LM head unless
tied), LoRA adapters in fp32, bf16 compute under autocast, non-reentrant gradient checkpointing,
and a cross-entropy over fp32 logits. ``peakBytes`` is what ``torch.cuda.max_memory_allocated``
reports at the peak, allocator overhead included; the CUDA context and the libraries' own memory
come on top as ``runtimeReserveBytes``, and a job fits when the sum is at most the GPU's memory.

Calibrated on an H200 (2026-11-27, torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50),
Llama shapes of 0.85B and 3.55B parameters, batch 8 x 512 tokens, LoRA r16 all-linear, gradient
checkpointing: every measured peak is within 15% (tests/unit/test_estimate.py). The int8 figures
are calibrated to the transformers.Trainer + peft run of the same settings, whose bitsandbytes
LLM.int8 backward holds about two bytes per quantized weight on top of the int8 weights (the
``quantizationWorkspace`` line). Settings outside what was measured (no gradient checkpointing,
FSDP, full fine-tunes, other architectures) follow the same accounting but are not calibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .config import RunSections, Strategy

GiB = 1024**3

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The per-layer linear layers of the Llama layout; LoRA target names map onto these."""
TARGET_ALIASES = {
    "query": "q_proj", "key": "k_proj", "value": "v_proj", "dense": "o_proj",
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
}
UNGATED_MLP_TYPES = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2")

INT4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
"""nf4 with double quantization: 4 bits, a uint8 absmax per block of 64 and an fp32 one per 256 blocks."""
INT8_BYTES_PER_WEIGHT = 1.0
"""LLM.int8: one byte per weight (the per-row fp32 scales are counted separately)."""
INT8_WORKSPACE_BYTES_PER_WEIGHT = 1.92
"""Measured: what the bitsandbytes int8 backward keeps on top of the int8 weights, per quantized weight."""
CHECKPOINT_BYTES = {"bf16": 2.0, "fp32": 4.0, "int8": 13.5, "int4": 4.0}
"""Bytes kept per layer x token x hidden unit under gradient checkpointing: the layer input in the
compute dtype; fp32 for int4 (the k-bit preparation makes the norms fp32, so the residual stream is
fp32); int8 keeps bitsandbytes' saved int8 inputs and scales besides (measured)."""
LOGIT_BYTES = 12.0
"""Bytes per logit at the loss: the bf16 logits, their fp32 copy and log-softmax, and the gradient."""
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw_32bit": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0,
                         "sgd": 4.0}
"""Optimizer state per trained parameter: AdamW's two fp32 moments, two bytes in 8-bit, SGD momentum.
Paged states can be evicted to host memory under pressure; they are counted as if on the device."""
ALLOCATOR_OVERHEAD = 0.04
"""Fraction of the dynamic memory (trained state, activations, logits) lost to the caching allocator."""
FIXED_OVERHEAD_BYTES = 64 * 1024**2
"""cuBLAS workspaces and small buffers allocated through PyTorch."""
RUNTIME_RESERVE_BYTES = 1 * GiB
"""CUDA context, kernels and library handles: memory the process holds outside PyTorch's allocations."""


MAX_DIMENSION = 2**31
"""The largest size (hidden, layers, vocabulary...) a config.json may give; beyond it the file is not
a real model's, and the arithmetic would overflow."""


class ModelConfigError(ValueError):
    """config.json lacks a field the estimate needs, or is not a decoder-only transformer config."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a backbone's config.json."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    gated_mlp: bool = True
    experts: int = 1
    """Experts per MoE layer (1 for a dense model); every expert's weights are resident."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read the Hugging Face config.json fields (Llama, Mistral, Qwen, Gemma, GPT-2 style names)."""
        if isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], "model_type": config["text_config"].get("model_type", "")}

        def pick(*names: str, default: int | None = None) -> int:
            for name in names:
                value = config.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    if value > MAX_DIMENSION:
                        raise ModelConfigError(f"config.json: {name} is larger than {MAX_DIMENSION}: not a real model")
                    return value
            if default is not None:
                return default
            raise ModelConfigError(f"config.json has no {' or '.join(names)}: cannot estimate memory")

        hidden = pick("hidden_size", "n_embd", "d_model")
        heads = pick("num_attention_heads", "n_head", "num_heads")
        model_type = str(config.get("model_type") or "")
        return cls(
            hidden=hidden,
            layers=pick("num_hidden_layers", "n_layer", "num_layers"),
            intermediate=pick("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            vocab=pick("vocab_size"),
            heads=heads,
            kv_heads=pick("num_key_value_heads", "num_kv_heads", default=heads),
            head_dim=pick("head_dim", default=hidden // heads),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            gated_mlp=model_type not in UNGATED_MLP_TYPES,
            experts=pick("num_local_experts", "num_experts", default=1),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer (one expert's MLP)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if self.gated_mlp:
            shapes["gate_proj"] = (self.hidden, self.intermediate)
        return shapes

    def linear_parameters(self) -> int:
        """Weights of every decoder layer's linear layers: what int8/int4 quantize."""
        per_layer = 0
        for name, (fan_in, fan_out) in self.linears().items():
            copies = self.experts if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += fan_in * fan_out * copies
        return self.layers * per_layer

    def other_parameters(self) -> int:
        """Embeddings, the LM head (unless tied) and norms: kept in 16/32 bits under quantization."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    def parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()

    def lora_parameters(self, r: int, targets: list[str]) -> int:
        """Adapter parameters: r x (in + out) per targeted linear layer. Names the layout does not
        know count as all-linear (an upper bound)."""
        shapes = self.linears()
        if targets == ["all-linear"]:
            chosen = set(shapes)
        else:
            chosen = {TARGET_ALIASES.get(t.rsplit(".", 1)[-1], t.rsplit(".", 1)[-1]) for t in targets}
            if not chosen <= set(LINEAR_NAMES):
                chosen = set(shapes)
        per_layer = 0
        for name in chosen & set(shapes):
            fan_in, fan_out = shapes[name]
            copies = self.experts if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += r * (fan_in + fan_out) * copies
        return self.layers * per_layer


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run that decide its memory."""

    quantization: str = "none"
    lora: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    optimizer: str = "adamw"
    precision: str = "bf16"
    """bf16/fp16 (16-bit compute) or fp32; auto is taken as bf16 (a GPU)."""
    micro_batch: int = 4
    max_length: int = 1024
    gradient_checkpointing: bool = True
    world_size: int = 1
    strategy: Strategy = "ddp"
    sequences_per_sample: int = 1
    """2 for the preference methods: a pair's chosen and rejected answers go through the model together."""

    @classmethod
    def from_run(cls, run: RunSections, world_size: int = 1, strategy: Strategy = "ddp",
                 micro_batch: int | None = None, gradient_checkpointing: bool | None = None) -> RunSettings:
        """The run's settings; batchSize auto is taken as micro-batch 1 and gradientCheckpointing auto
        as on (the leanest choices), unless ``micro_batch`` / ``gradient_checkpointing`` are given."""
        tc = run.training
        if micro_batch is None:
            micro_batch = tc.batch_size if isinstance(tc.batch_size, int) else 1
        if gradient_checkpointing is None:
            gradient_checkpointing = tc.gradient_checkpointing is not False
        return cls(
            quantization=run.quantization,
            lora=run.lora.enabled,
            lora_r=run.lora.r,
            lora_targets=tuple(run.lora.target_modules),
            optimizer=tc.optimizer,
            precision="fp32" if tc.precision == "fp32" else "bf16",
            micro_batch=micro_batch,
            max_length=run.dataset.max_length,
            gradient_checkpointing=gradient_checkpointing,
            world_size=world_size,
            strategy=strategy,
            sequences_per_sample=2 if run.preference_tuning else 1,
        )


@dataclass
class Estimate:
    """Peak GPU memory of one training process, in bytes, by what holds it."""

    weights: int
    trainable: int
    """Trained parameters with their gradients and optimizer states."""
    activations: int
    logits: int
    quantization_workspace: int
    allocator_overhead: int
    peak: int
    runtime_reserve: int
    parameters: int
    trainable_parameters: int
    settings: RunSettings
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def required(self) -> int:
        """The peak plus what the process holds outside PyTorch: compare this with the GPU's memory."""
        return self.peak + self.runtime_reserve

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.required <= self.gpu_memory

    def as_json(self) -> dict[str, Any]:
        """camelCase, for `kubetune estimate --json`."""
        return {
            "peakBytes": self.peak,
            "requiredBytes": self.required,
            "gpuMemoryBytes": self.gpu_memory,
            "fits": self.fits,
            "breakdown": {
                "weights": self.weights,
                "trainableWithGradsAndOptimizer": self.trainable,
                "activations": self.activations,
                "logits": self.logits,
                "quantizationWorkspace": self.quantization_workspace,
                "allocatorOverhead": self.allocator_overhead,
            },
            "runtimeReserveBytes": self.runtime_reserve,
            "parameters": self.parameters,
            "trainableParameters": self.trainable_parameters,
            "settings": {to_camel(k): list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(self.settings).items()},
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """The breakdown as text, one item a line."""
        s = self.settings
        rows = [
            ("weights", self.weights),
            ("trained parameters + gradients + optimizer", self.trainable),
            ("activations", self.activations),
            ("logits and loss", self.logits),
            ("int8 workspace", self.quantization_workspace),
            ("allocator overhead", self.allocator_overhead),
        ]
        out = [
            f"model: {self.parameters / 1e9:.2f}B parameters, {self.trainable_parameters / 1e6:.1f}M trained; "
            f"quantization {s.quantization}, {'LoRA r' + str(s.lora_r) if s.lora else 'full fine-tune'}, "
            f"optimizer {s.optimizer}",
            f"per process: micro-batch {s.micro_batch} x {s.max_length} tokens, gradient checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}, {s.world_size} process(es) ({s.strategy})",
        ]
        out += [f"  {label:<44} {gib(value):>10}" for label, value in rows if value or label != "int8 workspace"]
        out.append(f"  {'peak (PyTorch allocations)':<44} {gib(self.peak):>10}")
        out.append(f"  {'+ CUDA context and libraries':<44} {gib(self.runtime_reserve):>10}")
        out.append(f"  {'= required per GPU':<44} {gib(self.required):>10}")
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"GPU memory {gib(self.gpu_memory)}: {verdict}")
        out += [f"note: {n}" for n in self.notes]
        return out


def to_camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def gib(value: int) -> str:
    return f"{value / GiB:.2f} GiB"


def estimate(shape: ModelShape, settings: RunSettings, gpu_memory: int | None = None) -> Estimate:
    """Peak GPU memory of one training process (see the module docstring for what is counted)."""
    s = settings
    if s.quantization != "none" and not s.lora:
        raise ValueError(f"quantization {s.quantization} requires LoRA")
    sixteen_bit = s.precision != "fp32"
    dtype_bytes = 2 if sixteen_bit else 4
    tokens = s.micro_batch * s.sequences_per_sample * s.max_length
    notes: list[str] = []
    if s.sequences_per_sample > 1:
        # The reference pass (dpo, ipo) runs without gradients before the policy's forward pass and
        # keeps only one number per sequence, so it adds nothing to the peak.
        notes.append(f"preference pairs: {s.sequences_per_sample} sequences per sample")

    linear, other = shape.linear_parameters(), shape.other_parameters()
    if s.lora:
        trained = shape.lora_parameters(s.lora_r, list(s.lora_targets))
        frozen_linear, frozen_other = linear, other
        trained_bytes_each = 4 + 4 + OPTIMIZER_STATE_BYTES[s.optimizer]  # fp32 adapter, its gradient, states
    else:
        trained = linear + other
        frozen_linear = frozen_other = 0
        trained_bytes_each = 4 + 4 + OPTIMIZER_STATE_BYTES[s.optimizer]  # fp32 master weights
    if s.quantization == "int8":
        weight_bytes = frozen_linear * INT8_BYTES_PER_WEIGHT + shape.layers * 4 * sum(
            out for _, out in shape.linears().values())
        other_bytes = 4  # prepare_model_for_kbit_training casts the rest to fp32
    elif s.quantization == "int4":
        weight_bytes = frozen_linear * INT4_BYTES_PER_WEIGHT
        other_bytes = 4
    else:
        weight_bytes = frozen_linear * dtype_bytes
        other_bytes = dtype_bytes
    weights = weight_bytes + frozen_other * other_bytes
    trainable = trained * trained_bytes_each
    workspace = frozen_linear * INT8_WORKSPACE_BYTES_PER_WEIGHT if s.quantization == "int8" else 0.0

    if s.world_size > 1 and s.strategy == "fsdp":
        # Fully sharded: each rank holds 1/world of the parameters, gradients and states, and gathers
        # one layer's full weights at a time (two with prefetch).
        per_layer = weights / max(shape.layers, 1)
        weights = weights / s.world_size + 2 * per_layer
        trainable = trainable / s.world_size + 2 * trained * 4 / max(shape.layers, 1)
        workspace = workspace / s.world_size
        notes.append("FSDP is not calibrated on measurements")
    elif s.world_size > 1:
        trainable += trained * 4  # DDP's gradient buckets, a second copy of the gradients

    ckpt_key = s.quantization if s.quantization != "none" else ("bf16" if sixteen_bit else "fp32")
    layer_bytes = tokens * dtype_bytes * (
        6 * shape.hidden + 2 * shape.kv_heads * shape.head_dim
        + (4 if shape.gated_mlp else 2) * shape.intermediate)
    if s.gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * CHECKPOINT_BYTES[ckpt_key]
    else:
        activations = shape.layers * layer_bytes + shape.layers * tokens * shape.hidden * (
            CHECKPOINT_BYTES[ckpt_key] - dtype_bytes)
        notes.append("without gradient checkpointing the activations are not calibrated on measurements")
    logits = tokens * shape.vocab * (LOGIT_BYTES if sixteen_bit else LOGIT_BYTES + 4)
    if not s.lora:
        notes.append("full fine-tunes are not calibrated on measurements")

    dynamic = trainable + activations + logits
    overhead = dynamic * ALLOCATOR_OVERHEAD + FIXED_OVERHEAD_BYTES
    peak = weights + trainable + activations + logits + workspace + overhead
    return Estimate(
        weights=int(weights), trainable=int(trainable), activations=int(activations), logits=int(logits),
        quantization_workspace=int(workspace), allocator_overhead=int(overhead), peak=int(peak),
        runtime_reserve=RUNTIME_RESERVE_BYTES, parameters=shape.parameters(), trainable_parameters=trained,
        settings=settings, gpu_memory=gpu_memory, notes=notes,
    )


def read_shape(directory: Path) -> ModelShape:
    """The shape of a backbone from ``directory/config.json`` (or a config.json path)."""
    path = directory if directory.name == "config.json" else directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ModelConfigError(f"{path}: no config.json") from err
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"{path}: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return ModelShape.from_config(data)


def parse_quantity(value: str | int) -> int:
    """A Kubernetes quantity (80Gi, 24G, 81920Mi, 1e9) in bytes."""
    if isinstance(value, int):
        return value
    text = value.strip()
    suffixes = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
                "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], suffixes[suffix]
            break
    else:
        number, scale = text, 1
    try:
        amount = float(number)
    except ValueError as err:
        raise ValueError(f"{value!r} is not a quantity such as 80Gi or 24G") from err
    if amount <= 0:
        raise ValueError(f"{value!r}: must be more than 0")
    return int(amount * scale)


DEVICE_MARGIN = 0.15
"""The estimate's calibration tolerance: the trainer refuses a device only when even a peak this
much below the estimate would not fit its free memory."""


def device_verdict(got: Estimate, free: int, total: int) -> tuple[Literal["fits", "tight", "wontfit"], str]:
    """The trainer's check at start, against the device's free memory (torch.cuda.mem_get_info,
    taken with the CUDA context already created, so the runtime reserve is not added again)."""
    needed = f"estimated peak {gib(got.peak)}, the device has {gib(free)} free of {gib(total)}"
    if got.peak <= free:
        return "fits", needed
    if got.peak * (1 - DEVICE_MARGIN) <= free:
        return "tight", needed + f"; within the estimate's {DEVICE_MARGIN:.0%} margin, so training starts"
    return "wontfit", needed


def auto_fit(shape: ModelShape, run: RunSections, settings: RunSettings, budget: float | None) -> RunSettings:
    """The micro-batch and gradient checkpointing that training.batchSize / gradientCheckpointing auto
    choose, for an estimated peak of at most ``budget`` bytes (memoryFraction of the free memory);
    ``settings`` holds the rest. ``budget`` None: no device limit (the CPU).

    batchSize auto starts from one micro-batch per process for the whole global batch and halves it
    (as an out-of-memory does) until the peak, with checkpointing on where it is auto, fits; then
    checkpointing auto is off where that micro-batch fits without it. Never below micro-batch 1: the
    device check decides then."""
    tc = run.training
    micro = math.ceil(tc.global_batch(settings.world_size) / settings.world_size) if tc.auto_batch \
        else settings.micro_batch
    fixed = tc.gradient_checkpointing if isinstance(tc.gradient_checkpointing, bool) else None
    chosen = replace(settings, micro_batch=micro, gradient_checkpointing=True if fixed is None else fixed)
    if budget is None:
        return replace(chosen, gradient_checkpointing=bool(fixed))
    while tc.auto_batch and chosen.micro_batch > 1 and estimate(shape, chosen).peak > budget:
        chosen = replace(chosen, micro_batch=chosen.micro_batch // 2)
    without = replace(chosen, gradient_checkpointing=False)
    if fixed is None and estimate(shape, without).peak <= budget:
        return without
    return chosen


def estimate_run(shape: ModelShape, run: RunSections, world_size: int = 1, strategy: Strategy = "ddp",
                 gpu_memory: int | None = None) -> Estimate:
    """The estimate of a run before it starts (the operator, `kubetune estimate`).

    Integer settings are estimated as they are. With training.batchSize or gradientCheckpointing
    auto, whether the run fits is decided at micro-batch 1 with checkpointing on (the least the
    trainer can choose); where it fits a known ``gpu_memory``, the estimate shown is what the trainer
    would choose on that GPU (memoryFraction of it, less the runtime reserve, as its free memory)."""
    tc = run.training
    settings = RunSettings.from_run(run, world_size=world_size, strategy=strategy)
    got = estimate(shape, settings, gpu_memory=gpu_memory)
    if not tc.auto_batch and tc.gradient_checkpointing != "auto":
        return got
    if gpu_memory is None or not got.fits:
        got.notes.append("batchSize/gradientCheckpointing auto: estimated at the least the trainer can choose "
                         "(micro-batch 1, gradient checkpointing on)" if tc.auto_batch else
                         "gradientCheckpointing auto: estimated with gradient checkpointing on")
        return got
    budget = tc.memory_fraction * (gpu_memory - RUNTIME_RESERVE_BYTES)
    chosen = auto_fit(shape, run, settings, budget)
    got = estimate(shape, chosen, gpu_memory=gpu_memory)
    got.notes.append(f"auto-fit: what the trainer would choose to fill at most {tc.memory_fraction:.0%} of the "
                     "GPU's free memory")
    return got
