"""What the engine needs of a model family: which families it drives (check_servable), each layer's sliding
window and the additive mask that applies it, and the keyword a decoder layer takes its cache by.

Served: Llama, Mistral (with or without `sliding_window`), Qwen2 and Qwen3 (sliding layers named in
`layer_types`), Gemma 1 (its scaled embedding is a module of its own) and Gemma 2 (alternating sliding layers,
soft-capped attention inside its attention module, soft-capped final logits). Each is tested on a tiny random model
against transformers' generate() (tests/test_serve_families.py); anything else is refused by name.
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from ..core.sites import hosts

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")  # each tested against generate()
# config features the engine's forward does not apply: refused by name. (Gemma 2's attention soft-capping and
# query scale live in its attention module, which the engine calls; its final-logit soft-capping the engine
# applies itself, final_logit_softcap.)
_UNHANDLED_CONFIG = ("use_bidirectional_attention",)
_BYPASSED = re.compile(r"(model)?")  # the modules the engine runs around rather than calls: the model, its body


def check_servable(model: nn.Module) -> None:
    """Raise TypeError unless `model` is a Llama-family causal LM the engine can drive."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if model_type not in SUPPORTED_MODEL_TYPES or inner is None or not all(hasattr(inner, p) for p in parts) \
            or not hasattr(model, "lm_head"):
        raise TypeError(
            f"deltatune.serve runs Llama-family causal LMs (model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}, "
            f"with model.embed_tokens/layers/norm/rotary_emb and lm_head); got {type(model).__name__} "
            f"(model_type {model_type!r}). Generate with model.generate() for other architectures"
        )
    unhandled = [f for f in _UNHANDLED_CONFIG if getattr(config, f, None) not in (None, False)]
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if unhandled or kinds:
        raise TypeError(f"deltatune.serve does not apply {model_type} config feature "
                        f"{unhandled[0] if unhandled else 'layer_types ' + repr(sorted(kinds))}; generate with "
                        "model.generate() instead")
    bypassed = [path for path, _ in hosts(model) if _BYPASSED.fullmatch(path)]
    if bypassed:
        raise TypeError(f"an adapter wraps {bypassed[0] or 'the whole model'}, which the serving engine does not call as "
                        "a module; serve adapters placed on layers inside the decoder blocks")


def sliding_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), as transformers' masks apply it: Qwen2/Qwen3
    name each layer's kind in `layer_types`; Mistral slides every layer when `sliding_window` is set."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return [window if kind == "sliding_attention" else None for kind in kinds[: config.num_hidden_layers]]
    return [window] * config.num_hidden_layers


def _additive_mask(allowed: torch.Tensor, positions: torch.Tensor, window: int | None, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """0 where a query may attend to a key, the dtype's minimum elsewhere (read alike by sdpa and eager
    attention). `allowed` (1 or B, 1, T, K); with a window, key j is visible to the query at position p only
    if j > p - window (transformers' sliding_window_overlay)."""
    allowed = allowed.to(device)
    if window is not None:
        keys = torch.arange(allowed.shape[-1], device=device)
        allowed = allowed & (keys > positions.to(device)[:, None, :, None] - window)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def cache_kwarg(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` from transformers 5.25 on (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    kind = type(layer)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(layer.forward).parameters  # follows the deprecation wrapper's __wrapped__
        _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[kind]


_CACHE_KWARG: dict[type, str] = {}


def final_logit_softcap(config, logits: torch.Tensor) -> torch.Tensor:
    """Gemma 2's cap·tanh(logits / cap) on the head's output (as its ForCausalLM does), else the logits."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
