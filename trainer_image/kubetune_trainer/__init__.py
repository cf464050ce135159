"""KubeTune trainer: LoRA, 8-bit and 4-bit (QLoRA) fine-tuning of causal language models."""

__version__ = "0.1.0"
