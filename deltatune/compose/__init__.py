"""Composing adapters: weighted combinations (peft's add_weighted_adapter types) and LoRAHub's search."""
from .combine import LORA_TYPES, CombineError, combine_adapters  # noqa: F401
