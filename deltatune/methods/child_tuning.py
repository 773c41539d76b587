"""Child-tuning (Xu et al. 2021, arXiv:2109.05687): update only a "child network" of the weights.

    w ← w − η·Adam(∇L ⊙ M_t)     the mask M applied to the gradient before the optimizer (§3.1)

Child-tuning_F (task-free, `ChildTuningConfig`, peft_type "CHILD_TUNING_F"): every step a fresh
M_t ~ Bernoulli(p_F) per entry, the gradient rescaled by 1/p_F (unbiased). The masks come from the adapter's
own generator (seeded by `seed`, advanced once per step): the same on every DDP process, and its state is the
step hook's state, kept in checkpoints, so a resumed run draws the masks the uninterrupted one would. It is
full fine-tuning of the targeted parameters with masked updates, so every weight changes over a run and its
file is the changed tensors of a full fine-tune (as `FULL`'s: every selected parameter under its own name),
not a small adapter.

The optimizer treatment (deliberate deviation from AliceMind's ChildTuningAdamW): ChildTuningAdamW masks the
gradient before the moment updates, so momentum and AdamW's decoupled weight decay still move entries masked
at this step (§14 gotchas). Here masked entries are left bitwise unchanged by the step, decay included
(`MaskedUpdates`: the entries outside M_t are written back after optimizer.step()); the moments still see the
masked, rescaled gradient, as in ChildTuningAdamW.

Child-tuning_D (task-driven, `ChildTuningDConfig`, "CHILD_TUNING_D"): once before training (the loop's
pre-pass), the diagonal Fisher F_i = (1/N)·Σ (∂L/∂w_i)² over the training data, each weight's gradient
clipped to norm `fisher_clip` first (the authors' code); the top p_D fraction kept, threshold =
percentile(F, (1 − p_D)·100), M = F ≥ threshold (ties may keep a few more), fixed for the run, no rescaling.
Its weights move only inside M, so it is saved in FishMask's sparse form (int32 indices + values per Linear),
mergeable and mixable like FishMask; the paper's "encoder parameters only" is `target_modules` ("all-linear":
every Linear but the output head).

Search grids (§4.1): p_F in {0.2, 0.3, 0.4}, p_D in {0.1, 0.2, 0.3}. Learning rate: 2e-5 (full fine-tuning's;
the paper's BERT-large grid is 1e-5..4e-5) for F; D trains its sparse values at 1e-4, like FishMask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError
from ..core.model import adapters
from ..core.registry import register
from ..train.hooks import Hook
from .fishmask import FishMaskConfig, SparseDelta, apply_masks, check_fraction, fisher_scores
from .full import parameters_in_targets


@dataclass(frozen=True)
class ChildTuningConfig(AdapterConfig):
    """Child-tuning_F: full fine-tuning of the targeted parameters with a fresh Bernoulli(reserve_p) gradient
    mask each step, rescaled by 1/reserve_p.

    target_modules: None (every parameter) or the modules whose parameters train (e.g. "all-linear").
    reserve_p: p_F in (0, 1] (default 0.3; the paper's grid 0.2, 0.3, 0.4).
    seed: seeds the masks' generator (the same on every process).
    """

    peft_type: ClassVar[str] = "CHILD_TUNING_F"
    recommended_lr: ClassVar[float] = 2e-5

    reserve_p: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        check_fraction("reserve_p", self.reserve_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


class MaskedUpdates(Hook):
    """A method's optimizer treatment: the step changes only the entries of each parameter where its mask is
    True, bitwise (AdamW's decoupled decay and momentum included). Subclasses choose the masks in `masks`."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self._kept: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def masks(self, step: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def before_step(self, model, optimizer, step: int) -> None:
        self._kept = []
        for param, mask in zip(self.params, self.masks(step)):
            if param.grad is None:
                continue
            self.scale_grad(param, mask)
            self._kept.append((param, mask, param.detach()[~mask].clone()))

    def scale_grad(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        param.grad.mul_(mask)

    def on_step(self, model, optimizer, step: int) -> None:
        with torch.no_grad():
            for param, mask, old in self._kept:
                param.data[~mask] = old  # masked entries: bitwise as before the step
        self._kept = []


class BernoulliMasks(MaskedUpdates):
    """Child-tuning_F's masks: M ~ Bernoulli(p) drawn on the CPU from the adapter's generator, grad · M / p."""

    def __init__(self, params: list[nn.Parameter], p: float, seed: int) -> None:
        super().__init__(params)
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)

    def masks(self, step: int) -> list[torch.Tensor]:
        return [(torch.rand(p.shape, generator=self.generator) < self.p).to(p.device) for p in self.params]

    def scale_grad(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        param.grad.mul_(mask.to(param.grad.dtype) / self.p)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def select(model: nn.Module, config: ChildTuningConfig, sites) -> list[str]:
    return parameters_in_targets(model, config)


def step_hook(model: nn.Module, config: ChildTuningConfig, name: str) -> BernoulliMasks:
    adapter = adapters(model)[name]
    params = [param for param, _ in adapter.selected.values()]
    return BernoulliMasks(params, config.reserve_p, config.seed)


register(ChildTuningConfig, select=select, step_hook=step_hook, readers=("deltatune",))


# ---- Child-tuning_D ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChildTuningDConfig(FishMaskConfig):
    """Child-tuning_D: the top reserve_p fraction of Linear weights by (clipped) Fisher, fixed, no rescaling;
    FishMask's sparse delta and file. keep_fraction is unused (reserve_p decides); num_examples: the first N
    training examples (default: 1024; the paper uses the whole training set)."""

    peft_type: ClassVar[str] = "CHILD_TUNING_D"
    recommended_lr: ClassVar[float] = 1e-4

    reserve_p: float = 0.2
    fisher_clip: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_fraction("reserve_p", self.reserve_p)
        if isinstance(self.fisher_clip, bool) or not isinstance(self.fisher_clip, (int, float)) or self.fisher_clip <= 0:
            raise ConfigError(f"fisher_clip must be a positive number, got {self.fisher_clip!r}")


def percentile_masks(scores: dict[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """Flat indices with F ≥ percentile(F, (1 − p)·100) over every tensor at once (the authors' np.percentile)."""
    flat = torch.cat([s.flatten().double().cpu() for s in scores.values()])
    threshold = torch.quantile(flat, 1 - p, interpolation="linear") if flat.numel() <= 16_000_000 else \
        flat.kthvalue(max(1, int(round((1 - p) * flat.numel())))).values
    return {k: torch.nonzero(s.flatten().double().cpu() >= threshold).flatten() for k, s in scores.items()}


def d_prepass(model: nn.Module, config: ChildTuningDConfig, name: str, data: Any) -> None:
    deltas = {path: d for path, d in adapters(model)[name].deltas(model) if isinstance(d, SparseDelta)}
    scores = fisher_scores(deltas, model, data, per_example=False, batch_size=config.batch_size,
                           clip=config.fisher_clip)
    apply_masks(model, name, percentile_masks(scores, config.reserve_p))


register(ChildTuningDConfig, SparseDelta, prepass=d_prepass, readers=("deltatune",))
