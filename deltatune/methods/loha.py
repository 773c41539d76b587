"""LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098): a Hadamard product of two low-rank updates.

    ΔW = s · (W1a·W1b) ⊙ (W2a·W2b),     W1a, W2a (d_out × r),  W1b, W2b (r × d_in),  s = α/r

    h = W0·x + ΔW·x          (effective rank up to r², for 2·r·(d_out + d_in) parameters)

Initialisation as peft's: W1a, W1b, W2a kaiming-uniform (a=√5), W2b = 0, so ΔW = 0 at the start
(`init_weights=False`: all four random, for tests). Training-time regularisers, as peft/LyCORIS define them:
`rank_dropout` drops output rows of ΔW (each with probability p, the kept rows rescaled by 1/mean kept),
`module_dropout` skips the whole delta for a step with probability p. Both are off outside training.

File and config: peft's `LoHaConfig` and keys (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`), so files move
both ways. Linear layers only (and deltatune's 4-bit linears, read dequantized): peft's LoHa also adapts Conv
layers, with `use_effective_conv2d` for their kernels; deltatune adapts no Conv layer, so that option is refused
by name, and targeting an Embedding or GPT-2 Conv1D is refused (peft refuses those too). Mergeable: ΔW is explicit.
`_LycorisDelta` is shared with LoKr (methods/lokr.py), which differs only in how ΔW is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range, pattern_value
from ..core.delta import Delta
from ..core.registry import register
from ..core.sites import Stage, Target, weight_kind
from .lora import DEFAULT_TARGETS  # peft's LoHa/LoKr tables are its LoRA table

@dataclass(frozen=True)
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share, peft's names and defaults: r, alpha (s = α/r), rank_dropout and
    module_dropout (training only), per-module rank_pattern / alpha_pattern, init_weights."""

    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS
    recommended_lr: ClassVar[float] = 1e-3  # LyCORIS recipes train LoHa/LoKr above LoRA's 2e-4

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        check_range("rank_dropout", self.rank_dropout, 0.0, 1.0)
        check_range("module_dropout", self.module_dropout, 0.0, 1.0)
        if self.use_effective_conv2d:
            raise ConfigError(f"use_effective_conv2d=True applies to Conv layers, which deltatune's {self.peft_type} "
                              "does not adapt (Linear layers only); set it to false")

    def describe(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "rank_dropout": self.rank_dropout,
                "module_dropout": self.module_dropout, **super().describe(tensors)}

    def rank_and_scale(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, module_name, self.r)
        return r, pattern_value(self.alpha_pattern, module_name, self.alpha) / r


class _LycorisDelta(Delta):
    """h = y + ΔW·x with ΔW built by the subclass (`make_weight`); rank and module dropout as peft's."""

    additive = True  # two additive deltas commute, so either may be merged alone

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) == "linear"  # nn.Linear or a quantized linear

    def __init__(self, target: Target, config: LycorisConfig) -> None:
        super().__init__(target, config)
        self.r, self.scaling = config.rank_and_scale(target.name)
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.scale_rank_dropout = True

    def make_weight(self) -> torch.Tensor:
        """ΔW without s, (d_out, d_in)."""
        raise NotImplementedError

    def delta_weight(self, *, rank_dropout: bool = False) -> torch.Tensor:
        weight = self.make_weight() * self.scaling
        if rank_dropout:  # peft: a row of ΔW kept with probability 1 − p, the kept rows scaled by 1/mean
            drop = (torch.rand(weight.shape[0]) > self.rank_dropout).to(weight.dtype).to(weight.device)
            if self.scale_rank_dropout:
                drop = drop / drop.mean().clamp_min(torch.finfo(drop.dtype).tiny)
            weight = weight * drop[:, None]
        return weight

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        if self.training and self.module_dropout > 0 and not bool(torch.rand(1) > self.module_dropout):
            return y  # peft's module dropout: the whole delta skipped this forward
        weight = self.delta_weight(rank_dropout=self.training and self.rank_dropout > 0)
        return y + F.linear(x.to(weight.dtype), weight).to(y.dtype)

    def merge(self, weight, bias):
        return weight + self.delta_weight().detach().to(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.delta_weight().detach().to(weight.dtype), bias


@dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    """peft's `LoHaConfig`. init_weights: True (W2b = 0: ΔW = 0 at start) or False (all random)."""

    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = True


class LoHaLinear(_LycorisDelta):
    """ΔW = s·(W1a·W1b) ⊙ (W2a·W2b) on a Linear."""

    def __init__(self, target: Target, config: LoHaConfig) -> None:
        super().__init__(target, config)
        d_out, d_in = target.weight.shape
        r = self.r
        self.hada_w1_a = nn.Parameter(torch.empty(d_out, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, d_in))
        self.hada_w2_a = nn.Parameter(torch.empty(d_out, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, d_in))
        for param in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b)

    def make_weight(self) -> torch.Tensor:
        return _Hadamard.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)


class _Hadamard(torch.autograd.Function):
    """(W1a·W1b) ⊙ (W2a·W2b), saving only the four factors: the two (d_out, d_in) products are recomputed in
    the backward rather than kept per layer (as peft's HadaWeight does), with
    ∂/∂W1a = (G ⊙ W2a·W2b)·W1bᵀ, ∂/∂W1b = W1aᵀ·(G ⊙ W2a·W2b), and the same for W2 with W1's product."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):  # type: ignore[override]
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        other = grad * (w2a @ w2b)
        g1a, g1b = other @ w1b.T, w1a.T @ other
        other = grad * (w1a @ w1b)
        return g1a, g1b, other @ w2b.T, w2a.T @ other


register(LoHaConfig, LoHaLinear, readers=("peft", "deltatune"))
