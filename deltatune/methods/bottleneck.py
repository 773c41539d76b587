"""Bottleneck adapters: Houlsby (serial, after attention and MLP), Pfeiffer (serial, after the MLP only) and the
parallel adapter (beside a block, reading its input). Houlsby et al. 2019, arXiv:1902.00751:

    h ──┬──► W_down (m × d) ──► φ ──► W_up (d × m) ──┐
        └──────────────────────────────────────────(+)──► f(h) = h + W_up·φ(W_down·h + b_down) + b_up

Placed twice per layer (§2.1 of the paper): on the attention output and on the feed-forward output, both
before the residual add and the LayerNorm. On Llama-style models that is the output of the `self_attn` and
`mlp` blocks (each returns what is then added to the residual stream); on BERT, the `attention.output.dense`
and `output.dense` Linears (BertSelfOutput/BertOutput apply dropout, the residual and LayerNorm after them).
Any module can be named in `target_modules`: the adapter wraps it as a block site (keyword arguments pass
through; a tuple output has its first element changed).

m = d // reduction_factor (at least 1), d being the width of the wrapped module's output (the core's
`Target.output_width()`: a Linear's out_features, a block's last Linear). Near-identity start
(§3.6): both weights ~ N(0, 1e-2) truncated at ±2σ, biases 0, so f(h) ≈ h; `init_weights="zero_up"` zeroes
W_up as well (f(h) = h exactly at step 0, as in AdapterHub's "mam_adapter" init). Defaults follow AdapterHub's
`houlsby` config: reduction factor 16, swish. Deviation from the paper: the LayerNorms are not trained by
default; add them with `modules_to_save` (e.g. ["input_layernorm", "post_attention_layernorm"]) to follow it.

Not mergeable: φ is nonlinear, so f cannot fold into a weight. peft has no such method, so the adapter file is
peft's two files with `peft_type: "BOTTLENECK"` ("PFEIFFER", "PARALLEL_ADAPTER"), which peft refuses to
load; only deltatune reads them.

Pfeiffer (`PfeifferConfig`) is this same delta placed once per layer; the parallel adapter (`ParallelAdapter`)
reads the block's input x instead of its output: F'(x) = F(x) + s·W_up·φ(W_down·x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int
from ..core.delta import Delta
from ..core.registry import register
from ..core.sites import Stage, Target

ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}

_LLAMA_LIKE = ("self_attn", "mlp")  # blocks whose output is added to the residual stream
_BERT_LIKE = ("attention.output.dense", "output.dense")  # Linears followed by dropout + residual + LayerNorm
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "bert": _BERT_LIKE, "roberta": _BERT_LIKE,
}


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
    file_suffixes: ClassVar[tuple[str, ...]] = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
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
        d = target.output_width()
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


# ---- Pfeiffer: one serial adapter per layer, after the feed-forward block ----------------------------------
_BERT_FFN_OUT = r".*layer\.\d+\.output\.dense"  # a regex: the suffix "output.dense" would match attention's too
_FFN_ONLY: dict[str, str | tuple[str, ...]] = {
    "llama": ("mlp",), "mistral": ("mlp",), "qwen2": ("mlp",), "bert": _BERT_FFN_OUT, "roberta": _BERT_FFN_OUT,
}


@dataclass(frozen=True)
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer et al. 2021 (arXiv:2005.00247, §2; AdapterHub's SeqBn): the bottleneck adapter of
    `BottleneckAdapter`, once per layer, after the feed-forward output only (`mlp` on Llama-style models,
    `output.dense` on BERT), ReLU, reduction factor 16. About half Houlsby's parameters at similar accuracy.

    AdapterHub's `original_ln_before=True` (the residual taken before the LayerNorm) is what this placement
    gives on pre-norm Llama blocks: the adapter sees the MLP's output before the residual add. On BERT the
    adapter sits on `output.dense`, before BertOutput's dropout, residual and LayerNorm, as in Houlsby.
    """

    peft_type: ClassVar[str] = "PFEIFFER"
    default_target_modules: ClassVar[Mapping[str, str | tuple[str, ...]]] = _FFN_ONLY

    reduction_factor: int = 16
    activation: Literal["swish", "relu", "gelu", "tanh"] = "relu"
    init_weights: Literal["houlsby", "zero_up"] = "houlsby"


register(PfeifferConfig, BottleneckAdapter, readers=("deltatune",))


# ---- parallel adapter: beside a block, reading its input -----------------------------------------------------
@dataclass(frozen=True)
class ParallelAdapterConfig(AdapterConfig):
    """He et al. 2022 (arXiv:2110.04366, §3 and Table 4; AdapterHub's ParBn): h ← h + s·W_up·φ(W_down·x), x the
    block's input, computed beside the block (its output h is not read).

    target_modules: the blocks the adapter runs beside. None: the feed-forward block (`mlp`) of llama, mistral,
        qwen2, the paper's best place; name `self_attn` (or both) to put it beside attention. Any module works
        by name; on BERT name e.g. `output.dense` (its input is the FFN's intermediate activation).
    reduction_factor: m = d_in // reduction_factor (default 2, AdapterHub's ParBn; the paper's MAM adapter
        uses m = 512 on a 1024-wide model).
    scaling: s (default 4.0, the paper's best on the FFN).
    activation: φ (default "relu").
    init_weights: "mam" (AdapterHub's mam_adapter init: W_down Kaiming-uniform(a=√5), W_up = 0, biases 0: the
        base exactly at step 0) or "houlsby" (both ~ N(0, 1e-2) truncated at ±2σ: near identity).

    Recommended learning rate: 1e-3 (as the bottleneck adapters; the paper trains with 5e-5..1e-4 on BART/mBART
    at batch sizes in the thousands of tokens).
    """

    peft_type: ClassVar[str] = "PARALLEL_ADAPTER"
    file_suffixes: ClassVar[tuple[str, ...]] = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    recommended_lr: ClassVar[float] = 1e-3
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "llama": ("mlp",), "mistral": ("mlp",), "qwen2": ("mlp",),
    }

    reduction_factor: int = 2
    scaling: float = 4.0
    activation: Literal["swish", "relu", "gelu", "tanh"] = "relu"
    init_weights: Literal["mam", "houlsby"] = "mam"

    def validate(self) -> None:
        check_positive_int("reduction_factor", self.reduction_factor)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ConfigError(f"scaling must be a finite number (the paper's s, 4.0 on the FFN), got {self.scaling!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.activation!r}")
        if self.init_weights not in ("mam", "houlsby"):
            raise ConfigError(f"init_weights must be 'mam' or 'houlsby', got {self.init_weights!r}")


class ParallelAdapter(Delta):
    """F'(x) = F(x) + s·W_up·φ(W_down·x + b_down) + b_up: x the block's input, F the block (and earlier deltas)."""

    site = "block"
    mergeable = False
    supports = BottleneckAdapter.supports

    def __init__(self, target: Target, config: ParallelAdapterConfig) -> None:
        super().__init__(target, config)
        self.where, self.scaling = target.name, float(config.scaling)
        d_in, d_out = target.input_width(), target.output_width()
        m = max(1, d_in // config.reduction_factor)
        self.adapter_down = nn.Linear(d_in, m)
        self.adapter_up = nn.Linear(m, d_out)
        self.act = ACTIVATIONS[config.activation]()
        if config.init_weights == "mam":  # nn.Linear's own init is Kaiming-uniform(a=√5) for W_down
            nn.init.zeros_(self.adapter_up.weight)
        else:
            nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(self.adapter_up.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        if x.shape[-1] != self.adapter_down.in_features or y.shape[-1] != self.adapter_up.out_features:
            raise ValueError(
                f"the parallel adapter on {self.where} was built for inputs of width {self.adapter_down.in_features} "
                f"and outputs of width {self.adapter_up.out_features}, but the module took {tuple(x.shape)} and "
                f"returned {tuple(y.shape)}; target a block whose input and output are hidden states"
            )
        h = self.adapter_up(self.act(self.adapter_down(x.to(self.adapter_down.weight.dtype))))
        return y + (self.scaling * h).to(y.dtype)


register(ParallelAdapterConfig, ParallelAdapter, readers=("deltatune",))
