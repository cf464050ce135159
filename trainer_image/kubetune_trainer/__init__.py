"""KubeTune trainer: LoRA, 8-bit and 4-bit (QLoRA) fine-tuning of causal language models."""

from kubetune_contract import __version__ as __version__  # one version for the whole distribution
