"""Backbone loading: precision, quantization (bitsandbytes int8 / nf4 int4), k-bit prep, LoRA.

The order is the standard QLoRA one: ``BitsAndBytesConfig`` → ``from_pretrained`` →
``prepare_model_for_kbit_training`` → ``LoraConfig`` → ``get_peft_model``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from kubetune_contract.config import TrainerConfig

from .errors import InvalidInput

log = logging.getLogger(__name__)

# bitsandbytes says this on every int8 matmul on the CPU; once is plenty.
warnings.filterwarnings("once", message=r"MatMul8bitLt: inputs will be cast")


@dataclass
class Precision:
    """The compute dtype and how to get there."""

    dtype: torch.dtype
    autocast: bool
    """Run forward passes under ``torch.autocast`` (bf16/fp16 compute with fp32 adapters)."""


def device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(name: str, dev: torch.device) -> Precision:
    """``auto`` is bf16 on a CUDA device that supports it, else fp32."""
    if name == "auto":
        name = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    return Precision(dtype=dtype, autocast=dtype != torch.float32)


def quantization_config(quantization: str, compute_dtype: torch.dtype,
                        sharded: bool = False) -> BitsAndBytesConfig | None:
    """bitsandbytes settings: int8 (LLM.int8), int4 (nf4 with double quantization), or none.

    ``sharded`` (FSDP): the packed 4-bit data is stored in the compute dtype instead of uint8 (the
    same bytes, viewed as fewer and wider elements), as FSDP QLoRA recipes do: the quantized
    weights then have the dtype of the layer's other frozen weights, FSDP shards and all-gathers
    them like those, and a cast of the parameters to the compute dtype leaves them unchanged.
    """
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    if quantization == "int4":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
        )
    return None


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token (EOS when the tokenizer has none)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: Path, config: TrainerConfig, precision: Precision, dev: torch.device) -> Any:
    """The backbone, quantized when asked, on ``dev``; not yet prepared for training."""
    quant = quantization_config(config.quantization, precision.dtype,
                                sharded=config.distribution.strategy == "fsdp")
    # A full fine-tune keeps fp32 master weights; a frozen LoRA base can live in the compute dtype.
    dtype = torch.float32 if not config.lora.enabled else precision.dtype
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": config.model.trust_remote_code,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" else "cpu"}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise InvalidInput(f"{config.model.source}: cannot load as a causal language model: {err}") from err
    if quant is None:
        model.to(dev)
    if config.quantization == "int4" and dev.type == "cpu":
        keep_cpu_4bit_layout_trainable(model)
    return model


def keep_cpu_4bit_layout_trainable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference at the first eval-mode forward.

    On CPUs with AVX512-BF16, ``Linear4bit`` converts its weights to an inference-only layout the
    first time it runs in eval mode, and keeps them so; a training step after an evaluation would
    then backpropagate through a kernel without autograd support (wrong input gradients).
    """
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(path: Path, config: TrainerConfig, precision: Precision, dev: torch.device,
               gradient_checkpointing: bool | None = None) -> Any:
    """Load the backbone and make it trainable: LoRA adapters, or every weight for a full fine-tune.
    ``gradient_checkpointing``: what the trainer chose (training.gradientCheckpointing may be auto);
    None: on unless the config turns it off."""
    log.info(
        "loading model from %s (quantization %s, dtype %s, device %s)",
        path, config.quantization, str(precision.dtype).removeprefix("torch."), dev,
    )
    model = load_base(path, config, precision, dev)
    model.config.use_cache = False
    checkpointing = (config.training.gradient_checkpointing is not False if gradient_checkpointing is None
                     else gradient_checkpointing)
    ckpt_kwargs = {"use_reentrant": False}
    if config.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = config.lora.target_modules
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:
            raise InvalidInput(f"lora.targetModules: {err}") from err
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trained weights only (adapters, or all weights for a full fine-tune), on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy weights saved by :func:`trainable_state` back into ``model``."""
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
