"""Proxy-tuning (Liu et al. 2024, arXiv:2401.08565): steer a large base model at decoding time by the logit
difference of a small tuned model (the expert M⁺) and its untuned twin (the anti-expert M⁻). No weight of the
large model changes:

    p(x_t | x_<t) = softmax(s_M + α·(s_M⁺ − s_M⁻))          α = 1 in the paper (METHODS.md §16)

All three models read the same prefix, so they need the same vocabulary (checked: sizes, and the tokenizers'
vocabularies when given). Each model keeps its own slot KV cache and they decode in lockstep inside the
continuous-batching engine, so requests still join and leave at every step; a request's adapter applies to
the large base. The expert and the anti-expert may be one small model, with the tuned adapter on one side:

    small = truncated_twin(model, 8)                     # first 8 layers + the head of the large model
    dt.load_adapter(small, "runs/small-tuned", "tuned")  # trained on the task
    engine = ProxyEngine(model, tokenizer, expert=(small, "tuned"), anti_expert=(small, None))
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.model import adapters as attached_adapters
from .engine import Engine, check_servable
from .kv import SlotKVCache
from .sampling import RequestError

Side = tuple[nn.Module, str | None]  # a model and the adapter it runs with (None: the model alone)


class ProxyEngine(Engine):
    def __init__(self, model: nn.Module, tokenizer: Any, *, expert: Side, anti_expert: Side, alpha: float = 1.0,
                 expert_tokenizer: Any = None, **engine_kwargs: Any) -> None:
        # no prefix caching: the expert's and anti-expert's caches would need theirs too
        super().__init__(model, tokenizer, fused_lora=False, **{**engine_kwargs, "prefix_cache_bytes": 0})
        self.alpha = float(alpha)
        self.sides: list[tuple[nn.Module, str | None, SlotKVCache]] = []
        for role, (small, adapter) in (("expert", expert), ("anti_expert", anti_expert)):
            check_servable(small)
            if small is model:
                raise ValueError(f"the {role} is the base model itself; Proxy-tuning steers a base by other models")
            if small.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"Proxy-tuning needs one vocabulary: the {role} has {small.config.vocab_size} tokens, "
                                 f"the base {model.config.vocab_size}; use models that share a tokenizer")
            if adapter is not None and adapter not in attached_adapters(small):
                raise KeyError(f"the {role} has no adapter named {adapter!r}; attached: {sorted(attached_adapters(small))}")
            self.sides.append((small, adapter, SlotKVCache(small.config.num_hidden_layers)))
        if expert_tokenizer is not None and tokenizer is not None and expert_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("Proxy-tuning needs one tokenizer: the expert's vocabulary differs from the base's "
                             "(same size, other tokens); align the vocabularies first")
        limit = min(s.config.max_position_embeddings for s, _, _ in self.sides)
        self.max_model_len = min(self.max_model_len, limit)

    def _caches(self) -> list[SlotKVCache]:
        return [self.cache, *(cache for _, _, cache in self.sides)]

    def virtual_tokens(self, name: str | None) -> torch.Tensor | None:
        if super().virtual_tokens(name) is not None:  # the expert and anti-expert would read other positions
            raise RequestError(f"adapter {name!r} adds virtual tokens; Proxy-tuning serves weight adapters only",
                               param="model")
        return None

    def _logits(self, ids, positions, allowed, names, last, prefixes) -> torch.Tensor:
        """s_M + α·(s_M⁺ − s_M⁻) for every row, in fp32."""
        base = self._forward(self.model, self.cache, ids, positions, allowed, names, last)
        (expert, e_adapter, e_cache), (anti, a_adapter, a_cache) = self.sides
        rows = ids.shape[0]
        plus = self._forward(expert, e_cache, ids, positions, allowed, [e_adapter] * rows, last)
        minus = self._forward(anti, a_cache, ids, positions, allowed, [a_adapter] * rows, last)
        return base + self.alpha * (plus - minus)


def truncated_twin(model: nn.Module, layers: int) -> nn.Module:
    """A smaller model of the same family and vocabulary: the first `layers` decoder layers of `model`, its
    final norm and its head (copies, so adapters attached to the twin never reach `model`).

    With one embedded model this is how Proxy-tuning is shown: the twin is tuned on the task and steers the
    full model. The twin's own quality is lower (its last layer was never trained to feed the head).
    """
    check_servable(model)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be in [1, {total}] for a model of {total} layers, got {layers}")
    body = model.model
    kept = body.layers[layers:]
    body.layers = body.layers[:layers]  # deepcopy only what the twin keeps
    try:
        twin = copy.deepcopy(model)
    finally:
        body.layers = nn.ModuleList([*body.layers, *kept])
    twin.config.num_hidden_layers = layers
    if getattr(twin.config, "layer_types", None):
        twin.config.layer_types = twin.config.layer_types[:layers]
    return twin
