"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable keys and values before every layer's cache.

    P (p × 2·L·d_kv) ──view──► per layer l: K_l, V_l (kv_heads, p, head_dim) ──► cache [K_l ; k(x)], [V_l ; v(x)]
    attention_mask (B, T) ──► [1…1 ; mask];  logits (B, T, V): the prefix adds no positions to the output

With `prefix_projection` (the paper's reparametrisation, §4.3), P = MLP(E): E (p × d_kv) ─ Linear(d_kv, h) ─
Tanh ─ Linear(h, 2·L·d_kv), h = `encoder_hidden_size`; without it (peft's default) P is trained directly.
Laid out as peft does, grouped-query attention included: d_kv = head_dim · num_key_value_heads (token_dim and
num_attention_heads of the config hold d_kv and the kv heads after attach), and P viewed as (p, 2L, kv_heads,
head_dim), layer l taking rows 2l (keys) and 2l+1 (values). The keys are stored as given (no rotary
embedding), and the new tokens are numbered from p, as in peft's forward.

The mechanism (hooks, the cache filled at prefill, under either cache name; use_cache=False runs with a
cache of its own for the forward; decoding steps only grow the mask; mixed batches with LoRA and base rows,
prefixes of different lengths padded and masked) is the virtual-token base, `deltatune.methods.virtual_tokens`.

The file holds P (peft's `prompt_embeddings`). With the projection the file's P is derived from E and the
MLP, as with P-tuning: an inference load holds P exactly; a trainable load keeps a fresh projection and a
frozen offset so that P starts at the file's value (peft refuses a trainable load of a projected prefix);
deltatune's checkpoints keep E, the MLP and the offset, so a run resumes exactly.

Learning rate: 1e-2 (peft's prefix-tuning examples; the paper uses 5e-5 with the MLP on GPT-2 at its batch
sizes, 8e-5 on BART). Not supported: encoder-decoder models, a prefix as long as the context, packed rows,
per-token routing, a batch mixing prefix rows with prompt-tuning or P-tuning rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..core.config import ConfigError, check_positive_int
from ..core.registry import register
from .virtual_tokens import KEY_VALUES_CHECKPOINTING, PromptLearningConfig, VirtualPart, file_view, resolve_prompt_learning, text_config_int


@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    """peft's PrefixTuningConfig (peft_type "PREFIX_TUNING"), written with the same keys.

    prefix_projection: train P through the reparametrisation MLP (False: P directly, peft's default).
    encoder_hidden_size: h of the MLP (None: token_dim, filled at attach as peft does).
    init_weights: None (P or E ~ N(0, 1), nn.Embedding's init) or "zero" (P, or the MLP's last layer, zero).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    method_name: ClassVar[str] = "prefix tuning"
    recommended_lr: ClassVar[float] = 1e-2  # peft's prefix-tuning examples
    gradient_checkpointing_problem: ClassVar[str] = KEY_VALUES_CHECKPOINTING

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be null (random) or 'zero', as in peft, got {self.init_weights!r}")


def resolve(model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
    """peft's sizes, with d_kv = head_dim · kv_heads for grouped-query attention; checked against the model."""
    heads = text_config_int(model, "num_attention_heads", "n_head", "num_heads")
    hidden = text_config_int(model, "hidden_size", "n_embd", "d_model")
    kv_heads = text_config_int(model, "num_key_value_heads") or heads
    head_dim = text_config_int(model, "head_dim") or (hidden // heads if hidden and heads else None)
    if not (heads and head_dim):
        raise ConfigError(f"prefix tuning needs the model config's attention sizes (num_attention_heads, hidden_size); "
                          f"{type(model).__name__}'s config lacks them")
    d_kv = head_dim * kv_heads
    for key, want in (("token_dim", d_kv), ("num_attention_heads", kv_heads)):
        given = getattr(config, key)
        if given is not None and given not in (want, hidden if key == "token_dim" else heads):
            raise ConfigError(f"{key} is {given}, but this model's keys and values need {want} "
                              f"(head_dim {head_dim} x {kv_heads} kv heads); this prefix was made for another model")
    context = text_config_int(model, "max_position_embeddings", "n_positions")
    if context is not None and config.num_virtual_tokens >= context:
        raise ConfigError(f"num_virtual_tokens is {config.num_virtual_tokens}, but the model's context holds "
                          f"{context} positions; a prefix must leave room for the input")
    layers = config.num_layers or text_config_int(model, "num_hidden_layers", "num_layers", "n_layer")
    if layers != text_config_int(model, "num_hidden_layers", "num_layers", "n_layer"):
        raise ConfigError(f"num_layers is {config.num_layers}, but the model has "
                          f"{text_config_int(model, 'num_hidden_layers', 'num_layers', 'n_layer')} layers")
    config = resolve_prompt_learning(model, config, token_dim=d_kv, num_attention_heads=kv_heads, num_layers=layers)
    return config.replace(encoder_hidden_size=config.encoder_hidden_size or config.token_dim)


class PrefixKeyValues(VirtualPart):
    """Prefix tuning's part: P directly (no projection, or the inference form), or MLP(E) + offset."""

    kind = "key_values"

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, name: str) -> None:
        super().__init__(model, name, config.num_virtual_tokens)
        device = next(model.parameters()).device
        p, d, L = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.layers, self.heads, self.head_dim = L, config.num_attention_heads, d // config.num_attention_heads
        if config.prefix_projection and not config.inference_mode:  # built in peft's order (same draws)
            self.embedding = nn.Embedding(p, d, device=device)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, 2 * L * d)).to(device)
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
            self.register_buffer("offset", torch.zeros(p, 2 * L * d, device=device))
            self.prompt_embeddings = None
        else:
            self.prompt_embeddings = nn.Parameter(torch.empty(p, 2 * L * d, device=device).normal_())
            if config.init_weights == "zero":
                nn.init.zeros_(self.prompt_embeddings)
            self.transform = None

    def prefix(self) -> torch.Tensor:
        """P (p, 2·L·d_kv)."""
        if self.transform is None:
            return self.prompt_embeddings
        return self.transform(self.embedding.weight) + self.offset

    def row_key_values(self) -> torch.Tensor:
        p = self.p  # (p, 2L·h·hd) -> (2L, h, p, hd) -> (L, 2, h, p, hd), peft's permute [2, 0, 3, 1, 4]
        kv = self.prefix().view(p, 2 * self.layers, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return kv.reshape(self.layers, 2, self.heads, p, self.head_dim)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.transform is None:
            return {"prompt_embeddings": self.prompt_embeddings}
        return {"prefix_encoder.embedding.weight": self.embedding.weight,
                **{f"prefix_encoder.transform.{k}": v for k, v in self.transform.state_dict(keep_vars=True).items()},
                "prefix_encoder.offset": self.offset}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        if self.transform is None:
            return self.tensors()
        with torch.no_grad():
            return {"prompt_embeddings": self.prefix().detach()}

    def live_from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.transform is None:
            return tensors
        return self._live_with_offset(tensors, lambda: self.transform(self.embedding.weight), self.offset,
                                      "prefix_encoder.offset")


def inject(model: nn.Module, config: PrefixTuningConfig, name: str) -> PrefixKeyValues:
    return PrefixKeyValues(model, config, name)


register(PrefixTuningConfig, inject=inject, resolve=resolve, save_view=file_view, readers=("peft", "deltatune"))
