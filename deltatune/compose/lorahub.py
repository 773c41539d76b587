"""LoRAHub (Huang et al. 2023, arXiv:2307.13269; sail-sg/lorahub): weights for K LoRAs found without gradients.

    Â = Σ wᵢAᵢ,  B̂ = Σ wᵢBᵢ,  ΔW = s·B̂Â          (a product of the weighted sums, as the reference code builds it)
    w* = argmin_w  CE(w; few-shot examples) + λ·mean|wᵢ|,   wᵢ ∈ [-1.5, 1.5],  λ = 0.05

CE is the mean cross-entropy per answer token of the model with the composed adapter on the few examples
(the paper uses 5 per task; 5-20 is the intended range); the search is nevergrad's NGOpt started at w = 0
with an evaluation budget (the reference's `max_inference_step`, 40), as in the reference. Each of several
search seeds runs its own budget (seed 0 from w = 0, the others from a random start: see `_search`); the seed whose recommendation scores the lowest objective on the same
few-shot examples wins. Nothing else is read: the objective never sees validation or held-out data.

The composed adapter is attached once and refilled for every candidate (`set_adapter_tensors`), so a
candidate costs one forward over the few examples. nevergrad is an optional dependency
(`pip install 'deltatune[compose]'`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.io import set_adapter_tensors
from ..core.model import active_adapters, adapters as attached, attach, delete_adapter, set_active
from .combine import CombineError, _plan, _sources

DEFAULT_BUDGET = 40
DEFAULT_L1 = 0.05
DEFAULT_BOUND = 1.5


@dataclass
class LoraHubResult:
    """The chosen weights (in the order of the adapters given) and what the search saw."""
    name: str
    weights: list[float]
    objective: float  # loss + l1 · mean|w| on the few-shot examples
    loss: float  # mean cross-entropy per answer token on the few-shot examples
    seed: int
    runs: list[dict[str, Any]] = field(default_factory=list)  # per seed: seed, weights, objective, loss, evaluations


def _nevergrad():
    try:
        import nevergrad
    except ImportError:
        raise ImportError("LoRAHub's search needs nevergrad, an optional dependency: pip install 'deltatune[compose]' "
                          "(or pip install nevergrad)") from None
    return nevergrad


def lorahub(
    model: nn.Module,
    adapters: Sequence[str | os.PathLike],
    examples: Sequence[dict[str, Any]],
    name: str,
    *,
    tokenizer: Any,
    budget: int = DEFAULT_BUDGET,
    seeds: Sequence[int] = (0,),
    l1: float = DEFAULT_L1,
    bound: float = DEFAULT_BOUND,
    max_length: int = 256,
    bf16: bool = False,
    progress: bool = False,
    activate: bool = True,
    log: Callable[[str], None] | None = None,
) -> LoraHubResult:
    """Attach adapter `name`, LoRAHub's composition of `adapters` with weights searched on `examples`.

    examples: records (`messages` or `prompt` + `completion`, as for training); the loss covers the answers.
    budget: objective evaluations per seed; seeds: one search per seed, the best kept. l1: λ of the
    penalty; bound: every weight lies in [-bound, bound]. The adapters need one rank and scale (LoRAHub
    sums their factors). Returns the weights and each seed's run; the adapter is left attached, filled with
    the winning weights (active unless `activate=False`), ready for `save_adapter`.
    """
    from ..data import tokenize
    from ..train.evaluate import eval_loss

    ng = _nevergrad()
    _check(budget, seeds, l1, bound, examples)
    rows, _ = tokenize(list(examples), tokenizer, max_length=max_length, source="lorahub examples")
    previous = active_adapters(model)
    with _sources(model, adapters) as sources:
        _, config, tensors_for = _plan(model, sources, [0.0] * len(sources), "lorahub", svd_rank=None,
                                       svd_clamp=None, density=None, majority_sign_method="total")
        if name in attached(model):
            raise CombineError(f"an adapter named {name!r} is already attached; delete it first or pick another name")
        with torch.random.fork_rng(devices=[]):
            attach(model, config, name, activate=False)
        try:
            set_active(model, name)

            def score(w: Sequence[float]) -> tuple[float, float]:
                set_adapter_tensors(model, name, tensors_for([float(x) for x in w]))
                loss = eval_loss(model, tokenizer, rows, batch_size=len(rows), bf16=bf16)["loss"]
                return loss + l1 * sum(abs(float(x)) for x in w) / len(w), loss

            runs = [_search(ng, score, len(sources), budget, seed, bound, progress, log) for seed in seeds]
            best = min(runs, key=lambda r: r["objective"])
            set_adapter_tensors(model, name, tensors_for(best["weights"]))
        except BaseException:
            delete_adapter(model, name)
            raise
    if activate:
        set_active(model, name)
    elif previous:
        set_active(model, previous)
    return LoraHubResult(name, best["weights"], best["objective"], best["loss"], best["seed"], runs)


def _search(ng, score, k: int, budget: int, seed: int, bound: float, progress: bool, log) -> dict[str, Any]:
    """One NGOpt run; returns the recommendation scored on the examples.

    Seed 0 starts at w = 0, as the reference does; another seed starts at a point it draws in
    [-bound/3, bound/3]. At LoRAHub's budgets NGOpt picks a deterministic optimizer (COBYLA), so from one
    start every seed returned the same weights (measured: docs/composition.md)."""
    import numpy as np
    from tqdm.auto import tqdm

    rng = np.random.RandomState(seed)
    start = np.zeros(k) if seed == 0 else rng.uniform(-bound / 3, bound / 3, size=k)
    param = ng.p.Array(init=start, lower=-bound, upper=bound)
    param.random_state = rng
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    best_seen = math.inf
    with tqdm(total=budget, desc=f"lorahub seed {seed}", unit="eval", disable=not progress, leave=False) as bar:
        for _ in range(budget):
            candidate = optimizer.ask()
            objective, _ = score(candidate.value)
            optimizer.tell(candidate, objective)
            best_seen = min(best_seen, objective)
            bar.update(1)
            bar.set_postfix(best=f"{best_seen:.4f}", refresh=False)
    weights = [float(x) for x in optimizer.provide_recommendation().value]
    objective, loss = score(weights)
    if log is not None:
        log(f"seed {seed}: objective {objective:.4f} (loss {loss:.4f}), weights {[round(w, 3) for w in weights]}")
    return {"seed": seed, "weights": weights, "objective": objective, "loss": loss, "evaluations": budget + 1}


def _check(budget, seeds, l1, bound, examples) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise CombineError(f"budget (objective evaluations per seed) must be a positive integer, got {budget!r}")
    if isinstance(seeds, (int, str)) or not len(seeds) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                  for s in seeds):
        raise CombineError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not math.isfinite(l1) or l1 < 0:
        raise CombineError(f"l1 must be a finite number >= 0, got {l1!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise CombineError(f"bound must be a finite number > 0, got {bound!r}")
    if not examples:
        raise CombineError("lorahub needs few-shot examples of the new task (5-20 records)")
