"""ReLoRA (Lialin et al. 2023, arXiv:2307.05695; Guitaricet/relora; shared/METHODS.md §7): a high-rank update
from a sequence of low-rank ones.

    h = W0·x + M·x + s·B·A·dropout(x),   s = α/r,   M = Σ_k s·B_k·A_k   (the merged segments, not trained)

Every `relora_steps` (N) optimizer steps the segment's s·B·A is merged into M, A is re-drawn kaiming-uniform
and B set to 0 (the function does not change), and the optimizer state of A and B is reset: "reset" zeroes
it, "random" zeroes a random fraction `optimizer_prune_ratio` of each state tensor (the reference's default
full reset is random pruning at 0.999), "magnitude" zeroes the entries below the `optimizer_prune_ratio`
quantile of |state| (the paper's ~99% pruning). After each restart the learning rate drops to 0 and re-warms
linearly over `restart_warmup_steps`, as a factor on the run's schedule inside the scheduler, so the logged lr
is jagged (the reference re-warms to the cosine value at the end of the warmup; here the factor multiplies
the schedule at each step, which differs from it by less than the schedule moves over the warmup).

Deviation from the reference: M is not added into W0 (W0 stays exactly the base, also a 4-bit one, and
`disable_adapters` / `delete_adapter` give it back bit for bit); it is held by the adapter as persistent
buffers (saved, restored on resume, never trained): the K − 1 merged segments' factors, rank (K − 1)·r
(K = ceil(total_step / N) segments), where K·r is below the layer's smaller dimension, else one dense
(d_out, d_in) sum. The whole learned change M + s·B·A is then saved as one plain LoRA of rank K·r, exactly
(peft and vLLM read it), when every layer holds factors; otherwise as this method's own dense file
(peft_type RELORA, deltatune only). The training loop says which. A last segment shorter than N (N does not
divide max_steps) is allowed; an N longer than the run is an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range
from ..core.delta import Delta
from ..core.registry import SavedView, register
from ..core.sites import Stage, Target, weight_kind
from ..train.distributed import agree
from ..train.hooks import Hook
from .lora import DEFAULT_TARGETS, LoraConfig


@dataclass(frozen=True)
class ReLoraConfig(AdapterConfig):
    """ReLoRA settings (deltatune's own peft_type; r, lora_alpha, lora_dropout as in LoRA).

    relora_steps: N, optimizer steps per segment (the reference's `--relora`). restart_warmup_steps: the
    linear re-warmup after each restart (reference: 50-100). optimizer_reset: "reset", "random" or
    "magnitude", with optimizer_prune_ratio the fraction zeroed by the last two. total_step: the run's
    optimizer steps, filled from max_steps by the training loop; it fixes K and so the merged part's size.
    """

    peft_type: ClassVar[str] = "RELORA"
    recommended_lr: ClassVar[float] = 1e-3  # the reference's ReLoRA stage: about 2x the full-rank lr (README 1e-3)
    default_target_modules = DEFAULT_TARGETS

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    relora_steps: int = 100
    restart_warmup_steps: int = 10
    optimizer_reset: Literal["reset", "random", "magnitude"] = "random"
    optimizer_prune_ratio: float = 0.999
    total_step: int | None = None

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("relora_steps", self.relora_steps)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        check_range("optimizer_prune_ratio", self.optimizer_prune_ratio, 0.0, 1.0, high_open=False)
        if self.optimizer_reset not in ("reset", "random", "magnitude"):
            raise ConfigError(f"optimizer_reset must be 'reset', 'random' or 'magnitude', got {self.optimizer_reset!r}")
        if not 0 <= self.restart_warmup_steps < self.relora_steps:
            raise ConfigError(f"restart_warmup_steps must be in [0, relora_steps={self.relora_steps}), got "
                              f"{self.restart_warmup_steps}")
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step)
            _check_interval(self, self.total_step, "total_step")

    @property
    def segments(self) -> int:
        """K: segments of the run (the last may be shorter than relora_steps)."""
        if self.total_step is None:
            raise ConfigError("ReLoRA needs total_step (the training loop fills it from max_steps): it sets how many "
                              "segments are merged, and so the size of the merged part")
        return math.ceil(self.total_step / self.relora_steps)

    def factored(self, d_out: int, d_in: int) -> bool:
        """Whether a (d_out, d_in) layer keeps its merged segments as factors (K·r below its smaller dimension)."""
        return self.segments * self.r < min(d_out, d_in)


def _check_interval(config: ReLoraConfig, total: int, name: str) -> None:
    if config.relora_steps > total:
        raise ConfigError(
            f"relora_steps ({config.relora_steps}) is longer than the run ({name}={total}): no restart would happen; lower "
            "relora_steps (a last segment shorter than relora_steps is allowed) or train plain LoRA")


class ReloraLinear(Delta):
    """s·B·A trained, plus the merged segments M (buffers), on nn.Linear, GPT-2 Conv1D or a quantized linear."""

    additive = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) in ("linear", "conv1d")

    def __init__(self, target: Target, config: ReLoraConfig) -> None:
        super().__init__(target, config)
        d_out, d_in = target.weight.shape
        self.r, self.scaling = config.r, config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(d_in, config.r, bias=False)
        self.lora_B = nn.Linear(config.r, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        merged_rank = (config.segments - 1) * config.r
        if config.factored(d_out, d_in):  # slot k holds segment k: A_k in rows, s·B_k in columns
            self.register_buffer("merged_A", torch.zeros(merged_rank, d_in))
            self.register_buffer("merged_B", torch.zeros(d_out, merged_rank))
        else:
            self.register_buffer("merged", torch.zeros(d_out, d_in))

    @property
    def is_factored(self) -> bool:
        return hasattr(self, "merged_A")

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        merged = F.linear(F.linear(x, self.merged_A), self.merged_B) if self.is_factored else F.linear(x, self.merged)
        return y + (merged + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        merged = self.merged_B @ self.merged_A if self.is_factored else self.merged
        return merged + (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.delta_weight().to(weight.dtype), bias

    @torch.no_grad()
    def restart(self, slot: int, generator: torch.Generator) -> None:
        """Merge s·B·A into segment `slot` of M, then A ← kaiming-uniform(a=√5), B ← 0."""
        if self.is_factored:
            rows = slice(slot * self.r, (slot + 1) * self.r)
            self.merged_A[rows] = self.lora_A.weight
            self.merged_B[:, rows] = self.lora_B.weight * self.scaling
        else:
            self.merged += (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        fresh = torch.empty(self.lora_A.weight.shape)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(fresh)
        self.lora_B.weight.zero_()


def _deltas(model: nn.Module, name: str) -> list[tuple[str, ReloraLinear]]:
    from ..core.model import adapters

    return list(adapters(model)[name].deltas(model))


class Restarts(Hook):
    """After optimizer step t = N, 2N, ... (before the last step): merge, re-initialise, reset the optimizer state.

    Stateless: what a restart draws comes from a generator seeded by (step, layer), so a resumed run and every
    process of a DDP run draw the same."""

    def __init__(self, model: nn.Module, config: ReLoraConfig, name: str) -> None:
        self.model, self.name, self.config = model, name, config

    def on_step(self, model: nn.Module, optimizer, step: int) -> None:
        c = self.config
        if step % c.relora_steps or step >= c.total_step:
            return
        params = []
        for i, (_, delta) in enumerate(_deltas(model, self.name)):
            delta.restart(step // c.relora_steps - 1, torch.Generator().manual_seed(1_000_003 * step + i))
            params += [delta.lora_A.weight, delta.lora_B.weight]
        kept = reset_optimizer_state(optimizer, params, c.optimizer_reset, c.optimizer_prune_ratio, step)
        agree(float(kept), "ReLoRA's optimizer-state pruning")


def reset_optimizer_state(optimizer, params: list[nn.Parameter], how: str, ratio: float, step: int) -> int:
    """Zero the AdamW moments (exp_avg, exp_avg_sq) of `params`: all ("reset"), a random fraction `ratio`
    ("random"), or the entries below the `ratio` quantile of |state| ("magnitude"). Returns the entries kept."""
    kept = 0
    for i, param in enumerate(params):
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for j, key in enumerate(("exp_avg", "exp_avg_sq")):
            value = state.get(key)
            if value is None:
                continue
            if how == "reset":
                value.zero_()
                continue
            if how == "random":
                g = torch.Generator().manual_seed(7_919 * step + 2 * i + j)
                keep = torch.rand(value.shape, generator=g) >= ratio
            else:
                magnitude = value.abs().float().flatten().cpu()
                threshold = torch.quantile(magnitude, ratio) if magnitude.numel() else 0.0
                keep = value.abs().cpu() > threshold
            value.mul_(keep.to(value.device, value.dtype))
            kept += int(keep.sum())
    return kept


def lr_factor(config: ReLoraConfig, total_steps: int):
    """f(s) for scheduler step s (0-based; the lr of optimizer step s + 1): 0 right after each restart, rising
    linearly to 1 over restart_warmup_steps (the reference's jagged schedule)."""
    n, warmup = config.relora_steps, config.restart_warmup_steps

    def factor(s: int) -> float:
        if s < n or warmup == 0 or s % n >= warmup:
            return 1.0
        return (s % n) / warmup

    return factor


def fit_run(config: ReLoraConfig, max_steps: int) -> ReLoraConfig:
    if config.total_step is not None and config.total_step != max_steps:
        raise ConfigError(f"adapter.total_step ({config.total_step}) differs from max_steps ({max_steps}); ReLoRA's "
                          "segments are fitted to the run: leave total_step unset (filled from max_steps) or set it equal")
    _check_interval(config, max_steps, "max_steps")
    return config.replace(total_step=max_steps)


def whole_change(model: nn.Module, adapter: Any, tensors: dict[str, torch.Tensor]) -> SavedView:
    """The file: M + s·B·A as one plain LoRA of rank K·r (scale 1: α = r), exactly, when every layer holds
    factors; else this method's own file with the dense merged part."""
    config: ReLoraConfig = adapter.config
    deltas = _deltas(model, adapter.name)
    if not all(delta.is_factored for _, delta in deltas):
        smallest = min(min(delta.lora_B.weight.shape[0], delta.lora_A.weight.shape[1]) for _, delta in deltas)
        return SavedView(config, tensors, f"ReLoRA: saved as a dense delta (RELORA, read by deltatune only): rank "
                                          f"{config.segments}x{config.r} is not below the smallest layer dimension ({smallest})")
    rank = config.segments * config.r
    out = {}
    for path, delta in deltas:
        out[f"{path}.lora_A.weight"] = torch.cat([tensors[f"{path}.merged_A"], tensors[f"{path}.lora_A.weight"]], dim=0)
        out[f"{path}.lora_B.weight"] = torch.cat([tensors[f"{path}.merged_B"],
                                                  tensors[f"{path}.lora_B.weight"] * delta.scaling], dim=1)
    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=config.lora_dropout, target_modules=tuple(adapter.sites),
                      modules_to_save=config.modules_to_save, task_type=config.task_type,
                      base_model_name_or_path=config.base_model_name_or_path, revision=config.revision)
    return SavedView(lora, out, f"ReLoRA: saved as one plain LoRA of rank {rank} ({config.segments} segments x r={config.r}), "
                                "exact; peft and vLLM read it")


register(ReLoraConfig, ReloraLinear, step_hook=Restarts, lr_factor=lr_factor, fit_run=fit_run, save_view=whole_change)
