"""LoKr (LyCORIS; Edalati et al. 2022, KronA, arXiv:2212.10650; Yeh et al. 2023): a Kronecker product update.

    ΔW = s · (W1 ⊗ W2),   W1 (l × m), W2 (k × n),   d_out = l·k, d_in = m·n,   s = α/r

    (l, k) = factorization(d_out), (m, n) = factorization(d_in): the factor pair nearest √dim, smaller first
    (4096 -> 64 × 64), or with `decompose_factor` = f > 0 dividing dim, (f, dim / f).

W2 is low-rank, W2a·W2b (k × r, r × n), when r < max(k, n)/2, else full; W1, the small factor, is full unless
`decompose_both` is set and r < max(l, m)/2 (then W1a·W1b). Initialisation as peft's: W1 (or W1a) = 0 and the
others kaiming-uniform (a=√5), so ΔW = 0 at start; `init_weights="lycoris"` zeroes W2 (or W2b) instead and
False draws everything random. `rank_dropout` drops rows of ΔW (rescaled by 1/mean kept only with
`rank_dropout_scale`, as peft does), `module_dropout` skips the delta for a step; both training only.

File and config: peft's `LoKrConfig` and keys (`lokr_w1`, `lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`,
`lokr_w2_b`). Linear layers only, as LoHa (methods/loha.py: the shared forward, dropout and merge).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.registry import register
from ..core.sites import Target
from .loha import LycorisConfig, _LycorisDelta


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dimension: with factor > 0 dividing it, (factor, dimension/factor); otherwise the
    pair that keeps m + n smallest while m ≤ factor (−1: no bound), i.e. the divisor pair nearest √dimension."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > bound:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


@dataclass(frozen=True)
class LoKrConfig(LycorisConfig):
    """peft's `LoKrConfig`. decompose_both: W1 low-rank too (when r < max(l, m)/2). decompose_factor: the
    factor to split each dimension by (−1: near √dim). rank_dropout_scale: rescale kept rows by 1/mean.
    init_weights: True (W1 = 0), "lycoris" (W2 = 0) or False (all random)."""

    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    def describe(self, tensors):
        return {**super().describe(tensors), "decompose_both": self.decompose_both,
                "decompose_factor": self.decompose_factor}

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError(f"decompose_factor must be -1 (near √dim) or a positive integer, got {self.decompose_factor}")
        if self.init_weights not in (True, False, "lycoris"):
            raise ConfigError(f"init_weights must be true, false or 'lycoris', got {self.init_weights!r}")


class LoKrLinear(_LycorisDelta):
    """ΔW = s·(W1 ⊗ W2) on a Linear, each factor full or a rank-r product."""

    def __init__(self, target: Target, config: LoKrConfig) -> None:
        super().__init__(target, config)
        self.scale_rank_dropout = config.rank_dropout_scale
        d_out, d_in = target.weight.shape
        (l, k), (m, n), r = factorization(d_out, config.decompose_factor), factorization(d_in, config.decompose_factor), self.r
        if config.decompose_both and r < max(l, m) / 2:
            self.lokr_w1_a, self.lokr_w1_b = nn.Parameter(torch.empty(l, r)), nn.Parameter(torch.empty(r, m))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(l, m))
        if r < max(k, n) / 2:
            self.lokr_w2_a, self.lokr_w2_b = nn.Parameter(torch.empty(k, r)), nn.Parameter(torch.empty(r, n))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(k, n))
        for param in self.parameters():
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if config.init_weights == "lycoris":
            nn.init.zeros_(self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_b)
        elif config.init_weights:
            nn.init.zeros_(self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a)

    def _factor(self, name: str) -> torch.Tensor:
        full = self._parameters.get(name)
        return full if full is not None else self._parameters[f"{name}_a"] @ self._parameters[f"{name}_b"]

    def make_weight(self) -> torch.Tensor:
        return torch.kron(self._factor("lokr_w1"), self._factor("lokr_w2"))  # (l·k, m·n) = (d_out, d_in)


register(LoKrConfig, LoKrLinear, readers=("peft", "deltatune"))
