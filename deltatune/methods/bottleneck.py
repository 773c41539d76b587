"""Houlsby bottleneck adapter (Houlsby et al. 2019, arXiv:1902.00751): a serial adapter after a sublayer's output.

    h ──┬──► W_down (m × d) ──► φ ──► W_up (d × m) ──┐
        └──────────────────────────────────────────(+)──► f(h) = h + W_up·φ(W_down·h + b_down) + b_up

Placed twice per layer (§2.1 of the paper): on the attention output and on the feed-forward output, both
before the residual add and the LayerNorm. On Llama-style models that is the output of the `self_attn` and
`mlp` blocks (each returns what is then added to the residual stream); on BERT, the `attention.output.dense`
and `output.dense` Linears (BertSelfOutput/BertOutput apply dropout, the residual and LayerNorm after them).
Any module can be named in `target_modules`: the adapter wraps it as a block site (keyword arguments pass
through; a tuple output has its first element changed).

m = d // reduction_factor (at least 1), d being the width of the wrapped module's output. Near-identity start
(§3.6): both weights ~ N(0, 1e-2) truncated at ±2σ, biases 0, so f(h) ≈ h; `init_weights="zero_up"` zeroes
W_up as well (f(h) = h exactly at step 0, as in AdapterHub's "mam_adapter" init). Defaults follow AdapterHub's
`houlsby` config: reduction factor 16, swish. Deviation from the paper: the LayerNorms are not trained by
default; add them with `modules_to_save` (e.g. ["input_layernorm", "post_attention_layernorm"]) to follow it.

Not mergeable: φ is nonlinear, so f cannot fold into a weight. peft has no such method, so the adapter file is
peft's two files with `peft_type: "BOTTLENECK"`, which peft refuses to load; only deltatune reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int
from ..core.delta import Delta
from ..core.registry import register
from ..core.sites import BaseWeight, Stage, Target, weight_kind

ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}

_LLAMA_LIKE = ("self_attn", "mlp")  # blocks whose output is added to the residual stream
_BERT_LIKE = ("attention.output.dense", "output.dense")  # Linears followed by dropout + residual + LayerNorm
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "bert": _BERT_LIKE, "roberta": _BERT_LIKE,
}
_ADAPTER_INTERNALS = {"deltas", "modules_to_save", "original_module"}  # other adapters' modules inside a block


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Houlsby serial bottleneck adapters (deltatune's own method and file; peft has none).

    target_modules: modules whose output gets an adapter. None: the attention and feed-forward outputs of
        llama, mistral, qwen2 (`self_attn`, `mlp`), bert and roberta (`attention.output.dense`, `output.dense`).
    reduction_factor: m = d // reduction_factor (default 16, AdapterHub's houlsby; the paper sweeps m in 8..256).
    activation: φ, one of "swish" (default), "relu", "gelu", "tanh".
    init_weights: "houlsby" (W_down, W_up ~ N(0, 1e-2) truncated at ±2σ; near identity) or "zero_up" (W_up = 0:
        exactly the base at step 0).

    Recommended learning rate: 1e-4 to 1e-3 (the paper sweeps 3e-5..3e-3 with Adam; AdapterHub uses 1e-4).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    recommended_lr: ClassVar[float] = 1e-3  # Houlsby et al.: 1e-4 to 1e-3
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS

    reduction_factor: int = 16
    activation: Literal["swish", "relu", "gelu", "tanh"] = "swish"
    init_weights: Literal["houlsby", "zero_up"] = "houlsby"

    def validate(self) -> None:
        check_positive_int("reduction_factor", self.reduction_factor)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.activation!r}")
        if self.init_weights not in ("houlsby", "zero_up"):
            raise ConfigError(f"init_weights must be 'houlsby' or 'zero_up', got {self.init_weights!r}")


def output_width(target: Target) -> int:
    """d, the width of the module's output: a Linear's out_features; for a block, its last Linear/Conv1D
    (o_proj of an attention block, down_proj of an MLP); else the model config's hidden size."""
    if target.weight is not None:
        return target.weight.shape[1 if target.weight.kind == "embedding" else 0]
    last = None
    for path, module in target.module.named_modules():
        if _ADAPTER_INTERNALS.isdisjoint(path.split(".")) and weight_kind(module) in ("linear", "conv1d"):
            last = module
    if last is not None:
        return BaseWeight(last).shape[0]
    config = getattr(target.model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ConfigError(
        f"cannot tell the output width of {target.name} ({type(target.module).__name__}): it holds no Linear and the "
        "model config has no hidden_size; set target_modules to modules whose output is the hidden state "
        "(an attention or MLP block, or its output Linear)"
    )


class BottleneckAdapter(Delta):
    """f(h) = h + W_up·φ(W_down·h), h the wrapped module's output (its first element for a tuple)."""

    site = "block"
    mergeable = False

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))

    def __init__(self, target: Target, config: BottleneckConfig) -> None:
        super().__init__(target, config)
        self.where = target.name
        d = output_width(target)
        m = max(1, d // config.reduction_factor)
        self.adapter_down = nn.Linear(d, m)
        self.adapter_up = nn.Linear(m, d)
        self.act = ACTIVATIONS[config.activation]()
        nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
        if config.init_weights == "houlsby":
            nn.init.trunc_normal_(self.adapter_up.weight, std=1e-2, a=-2e-2, b=2e-2)
        else:
            nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        if y.shape[-1] != self.adapter_down.in_features:
            raise ValueError(
                f"the bottleneck adapter on {self.where} was built for outputs of width "
                f"{self.adapter_down.in_features} but the module returned shape {tuple(y.shape)}; target a module "
                "whose output is the hidden state"
            )
        h = y.to(self.adapter_down.weight.dtype)
        return y + self.adapter_up(self.act(self.adapter_down(h))).to(y.dtype)


register(BottleneckConfig, BottleneckAdapter, readers=("deltatune",))
