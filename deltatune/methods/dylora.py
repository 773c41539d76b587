"""DyLoRA (Valipour et al. 2023, arXiv:2210.07558): one LoRA trained so that every rank b ≤ r works alone.

    A (r × d_in), B (d_out × r), trained as LoRA's; a step uses only their first b components:

    h = W0·x + (α/b)·B[:, :b]·A[:b, :]·x,       b ~ U{r_min, …, r}, one b per optimizer step, all layers

Training (the paper's Algorithm 1): the step hook (`RankSampler`) samples b for every step from its own
generator (seeded from the run's seed, so DDP processes agree and a resume continues the same sequence).
`frozen=True`, the paper's main mode (§3, Eq. 7-8), updates only the b-th component (row b of A, column b of
B); `frozen=False` updates all b first components. Either way the components the step must not change are
restored after the optimizer step, with their optimizer state (AdamW's moments), so they stay bitwise
unchanged even though AdamW moves a parameter with zero gradient and non-zero state.

Outside training the adapter computes at `rank` (None: r), chosen when loading without retraining
(`load_adapter(model, path, overrides={"rank": 4})`, or `path@rank=4` on the command line); a rank above the
trained r is refused by name. It is a low-rank delta (`deltatune.core.lowrank`), so it is served by the fused
LoRA kernel and `save_as_lora` exports it at rank b as a plain LoRA file (r=b, lora_alpha=α) that peft and
vLLM read. DyLoRA is not in peft: its own file has peft_type "DYLORA" with LoRA's tensor keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range
from ..core.lowrank import LowRankFactors
from ..core.registry import register
from ..core.sites import Stage, Target
from .lora import DEFAULT_TARGETS, LoraLinear


@dataclass(frozen=True)
class DyLoraConfig(AdapterConfig):
    """r: the largest rank trained (r_max). lora_alpha: α in s = α/b. r_min: the smallest rank sampled.
    frozen: update only the b-th component per step (the paper's main mode) rather than all b first ones.
    rank: the rank used outside training (None: r), at most r. lora_dropout: on the branch's input.
    init_lora_weights: LoRA's (False: A and B random, for tests)."""

    peft_type: ClassVar[str] = "DYLORA"
    recommended_lr: ClassVar[float] = 2e-4
    default_target_modules: ClassVar = DEFAULT_TARGETS

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    r_min: int = 1
    frozen: bool = True
    rank: int | None = None
    init_lora_weights: bool | Literal["gaussian"] = True  # as LoRA's: A kaiming-uniform (or gaussian), B = 0

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("r_min", self.r_min)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.r_min > self.r:
            raise ConfigError(f"r_min ({self.r_min}) must be at most r ({self.r})")
        if self.rank is not None:
            check_positive_int("rank", self.rank)
            if self.rank > self.r:
                raise ConfigError(f"rank={self.rank} is above the trained maximum r={self.r}; a DyLoRA adapter "
                                  f"computes at any rank from 1 to {self.r}")

    file_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")

    def describe(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        return {"r": f"{self.r} (trained maximum)", "rank": f"{self.rank or self.r} (any of 1..{self.r} with DIR@rank=b)",
                "lora_alpha": self.lora_alpha, "mode": "frozen (component b per step)" if self.frozen else "all b first",
                **super().describe(tensors)}

    def check_file(self, tensors: Mapping[str, Any]) -> str:
        wrong = next((k for k, t in tensors.items() if k.endswith("lora_A.weight") and t.shape[0] != self.r), None)
        return f"{wrong} has {tensors[wrong].shape[0]} rows but r={self.r}" if wrong else ""

    def rank_and_scale(self, module_name: str) -> tuple[int, float]:  # LoraLinear's parameters at r_max
        return self.r, self.lora_alpha / self.r


class DyLoraLinear(LoraLinear):
    """LoRA's A and B at r_max; the forward uses the first b components at scale α/b."""

    def __init__(self, target: Target, config: DyLoraConfig) -> None:
        super().__init__(target, config)
        self.alpha = float(config.lora_alpha)
        self.rank = config.rank or config.r  # outside training
        self.sampled: int | None = None  # this step's b, set by RankSampler; used in training mode only

    def current_rank(self) -> int:
        return self.sampled if self.training and self.sampled is not None else self.rank

    def factors(self, b: int) -> LowRankFactors:
        return LowRankFactors(self.lora_A.weight[:b], self.lora_B.weight[:, :b], self.alpha / b)

    def low_rank_factors(self) -> LowRankFactors:
        return self.factors(self.rank)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        A, B, s = self.factors(self.current_rank())
        h = F.linear(self.lora_dropout(x.to(A.dtype)), A) * s  # (..., b)
        return y + F.linear(h, B).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        A, B, s = self.low_rank_factors()
        return (B @ A) * s


class RankSampler:
    """The step hook: samples b per optimizer step and masks the update of the components outside the step."""

    def __init__(self, model: nn.Module, config: DyLoraConfig, name: str) -> None:
        from ..core.model import adapters

        self.config, self.name, self.adapters = config, name, adapters
        self.generator = torch.Generator().manual_seed(torch.initial_seed())  # the run's seed: same on every process
        self.model = model
        self.rank = self._sample()
        self._saved: list[tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self._apply()

    def _sample(self) -> int:
        low, high = self.config.r_min, self.config.r
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def _deltas(self) -> list[DyLoraLinear]:
        return [d for _, d in self.adapters(self.model)[self.name].deltas(self.model)]

    def _apply(self) -> None:
        from ..train.distributed import agree

        agree(self.rank, f"DyLoRA's sampled rank of adapter {self.name!r}")  # one scalar all_reduce under DDP
        for delta in self._deltas():
            delta.sampled = self.rank

    def _kept(self, r: int) -> torch.Tensor:
        """(r,) True for the components this step must leave unchanged."""
        index = torch.arange(r)
        updated = index == self.rank - 1 if self.config.frozen else index < self.rank
        return ~updated

    def before_step(self, model: nn.Module, optimizer: Optimizer, step: int) -> None:
        self._saved = []
        kept = self._kept(self.config.r)
        for delta in self._deltas():
            for param, mask in ((delta.lora_A.weight, kept[:, None]), (delta.lora_B.weight, kept[None, :])):
                mask = mask.to(param.device)
                state = [(t, t.detach().clone()) for t in optimizer.state.get(param, {}).values()
                         if isinstance(t, torch.Tensor) and t.shape == param.shape]
                self._saved.append((param, mask, [(param, param.detach().clone()), *state]))

    def on_step(self, model: nn.Module, optimizer: Optimizer, step: int) -> None:
        with torch.no_grad():
            for _, mask, tensors in self._saved:
                for live, before in tensors:
                    live.copy_(torch.where(mask, before, live))
        self._saved = []
        self.rank = self._sample()
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.rank = int(state["rank"])
        self._apply()


register(DyLoraConfig, DyLoraLinear, step_hook=RankSampler, readers=("deltatune",))
