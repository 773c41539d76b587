"""VeRA (Kopiczko et al. 2024, arXiv:2310.11454): one pair of frozen random matrices shared by every layer,
and two trained scaling vectors per layer.

    A (r × max_in), B (max_out × r): frozen, shared;  each layer slices A[:, :d_in] and B[:d_out, :]

    h = W0·x + Λ_b·B_s·Λ_d·A_s·x = W0·x + λ_b ⊙ (B_s·(λ_d ⊙ (A_s·x))),     λ_d (r,), λ_b (d_out,) trained

No α: the vectors carry the scale. λ_b starts at 0 (ΔW = 0 at start) and λ_d at d_initial (0.1; §3.2 and
Table 6c); `init_weights=False` draws λ_b = 1, λ_d ~ N(0, 1) as peft does. Parameters per layer: r + d_out.

A and B are generated exactly as peft generates them: one CPU `torch.Generator` seeded with
`projection_prng_key`, A then B, each kaiming-uniform for its fan-in (bound √3·√2/√fan_in), sized to the
largest (d_out, d_in) among the targets. They are the adapter's model-level part, built before the deltas
from the target list (the registry's `shared`), holding only frozen buffers, so `merge_and_unload` works.
`save_projection=True` (peft's default) writes them once (`base_model.vera_A`, `base_model.vera_B`); with
False they are regenerated from the key on load. A file whose projections do not equal its key's is refused.
Two VeRA adapters share one pair (the same tensors) exactly when peft's values would be equal: the same key,
r and largest shapes (and device).

It is a low-rank delta (deltatune.core.lowrank): (λ_d ⊙ A_s, λ_b ⊙ B_s, 1) is served by the fused LoRA kernel
and exported by `save_as_lora` as a plain LoRA of rank r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range
from ..core.delta import Delta
from ..core.lowrank import LowRankFactors
from ..core.registry import register
from ..core.sites import Stage, Target, weight_kind
from .lora import DEFAULT_TARGETS  # peft's VeRA table for these architectures is its LoRA table

FILE_KEYS = ("base_model.vera_A", "base_model.vera_B")  # where peft writes the shared pair


@dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    """peft's `VeraConfig`: r (default 256: the shared rank is cheap), projection_prng_key, save_projection,
    vera_dropout (on the input), d_initial (λ_d's start), init_weights, fan_in_fan_out (detected from the
    layer, so ignored), bias ("none" only)."""

    peft_type: ClassVar[str] = "VERA"
    recommended_lr: ClassVar[float] = 1e-2  # a few scaling vectors: trained at ~10x LoRA's lr (a choice, not the paper's)
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def adapted_modules(self, tensors: Mapping[str, Any]) -> list[str]:
        return super().adapted_modules({k: t for k, t in tensors.items() if k not in FILE_KEYS})

    def describe(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        saved = all(k in tensors for k in FILE_KEYS)
        return {"r": self.r, "prng key": f"{self.projection_prng_key} (projection_prng_key)",
                "projections": "saved in the file" if saved else "regenerated from the key on load",
                "d_initial": self.d_initial, **super().describe(tensors)}

    def check_file(self, tensors: Mapping[str, Any]) -> str:
        A, B = (tensors.get(k) for k in FILE_KEYS)
        if A is not None and (A.dim() != 2 or A.shape[0] != self.r):
            return f"{FILE_KEYS[0]} has shape {tuple(A.shape)}, but r={self.r} needs ({self.r}, largest d_in)"
        if B is not None and (B.dim() != 2 or B.shape[1] != self.r):
            return f"{FILE_KEYS[1]} has shape {tuple(B.shape)}, but r={self.r} needs (largest d_out, {self.r})"
        return ""

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # peft's VeraConfig has no such field (it warns on the key)
            out.pop("exclude_modules", None)
        return out

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_range("vera_dropout", self.vera_dropout, 0.0, 1.0)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"projection_prng_key must be an integer, got {self.projection_prng_key!r}")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r}: deltatune's VeRA trains no biases; set bias to 'none'")


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's `_kaiming_init`: U(±√3·√2/√fan_in) drawn from `generator`; fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(key: int, r: int, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, max_in), B (max_out, r)) exactly as peft generates them from `projection_prng_key`."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    A = _kaiming((r, max_in), generator)
    return A, _kaiming((max_out, r), generator)


class VeraProjections(nn.Module):
    """The shared frozen pair of one VeRA adapter (buffers, never parameters)."""

    def __init__(self, config: VeraConfig, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.key, self.save = config.projection_prng_key, config.save_projection
        self.register_buffer("vera_A", A, persistent=False)
        self.register_buffer("vera_B", B, persistent=False)
        self.disabled = False

    def identity(self) -> tuple:
        """What peft's values depend on: two parts with equal identities hold equal tensors."""
        return (self.key, self.vera_A.shape[0], self.vera_B.shape[0], self.vera_A.shape[1], self.vera_A.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(FILE_KEYS, (self.vera_A, self.vera_B))) if self.save else {}

    def check_tensors(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """Why the given projections cannot load (they are not what the key generates), or None."""
        for key, live in zip(FILE_KEYS, (self.vera_A, self.vera_B)):
            given = tensors.get(key)
            if given is not None and not torch.equal(given.to(live.device), live.to(given.dtype)):
                return (f"{key} does not match projection_prng_key={self.key} (the shared VeRA matrices are generated "
                        "from that key, peft's way); the file was written with another key or its projections were "
                        "changed. Refused, since its vera_lambda vectors were trained against other matrices")
        return None

    def remove(self, model: nn.Module) -> None:
        """Nothing is hooked into the model: the deltas hold the only references."""


def shared_projections(model: nn.Module, config: VeraConfig, name: str, targets: Sequence[Target]) -> VeraProjections:
    """The adapter's pair, sized to the largest targeted (d_out, d_in); another VeRA adapter's pair is reused
    (the same tensors) when peft would generate equal values."""
    from ..core.adapter import PARTS_ATTR

    max_out = max(t.weight.shape[0] for t in targets)
    max_in = max(t.weight.shape[1] for t in targets)
    device = targets[0].weight.device
    wanted = (config.projection_prng_key, config.r, max_out, max_in, device)
    for part in (getattr(model, PARTS_ATTR, None) or {}).values():
        if isinstance(part, VeraProjections) and part.identity() == wanted:
            return VeraProjections(config, part.vera_A, part.vera_B)
    A, B = projections(config.projection_prng_key, config.r, max_out, max_in)
    return VeraProjections(config, A.to(device), B.to(device))


class VeraLinear(Delta):
    """λ_b ⊙ B_s·(λ_d ⊙ A_s·x) on a Linear or GPT-2 Conv1D (the site presents both as (d_out, d_in))."""

    additive = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) in ("linear", "conv1d")

    def __init__(self, target: Target, config: VeraConfig) -> None:
        super().__init__(target, config)
        if not isinstance(target.part, VeraProjections):
            raise ConfigError("VeRA deltas need the adapter's shared projections (Method.shared); attach VeRA with "
                              "deltatune.attach")
        self.d_out, self.d_in = target.weight.shape
        self._shared = (target.part,)  # a tuple: not registered as a submodule, so not in this delta's tensors
        self.vera_dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.d_out))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(self.d_out))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r))

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        part = self._shared[0]
        return part.vera_A[:, : self.d_in], part.vera_B[: self.d_out, :]  # (r, d_in), (d_out, r)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        A, B = self._sliced()
        x = self.vera_dropout(x.to(self.vera_lambda_d.dtype))
        out = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, A.to(x.dtype)), B.to(x.dtype))
        return y + out.to(y.dtype)

    def low_rank_factors(self) -> LowRankFactors:
        A, B = self._sliced()
        return LowRankFactors(self.vera_lambda_d[:, None] * A, self.vera_lambda_b[:, None] * B, 1.0)

    def delta_weight(self) -> torch.Tensor:
        A, B, _ = self.low_rank_factors()
        return B @ A

    def merge(self, weight, bias):
        return weight + self.delta_weight().detach().to(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.delta_weight().detach().to(weight.dtype), bias


register(VeraConfig, VeraLinear, shared=shared_projections, readers=("peft", "deltatune"))
