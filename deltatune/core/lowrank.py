"""The low-rank view: deltas whose change is ΔW = s·B·A answer one protocol, whatever their method.

    ΔW = s · B · A        A (r, d_in), B (d_out, r), s a float; (d_out, d_in) as the site presents W

A delta is low-rank when it is additive (`additive = True`: y + ΔW·x, commuting with other additive deltas)
and has `low_rank_factors() -> LowRankFactors` for the function it computes outside training. LoRA answers
(A, B, α/r); DyLoRA its first b components at α/b; VeRA (diag(λ_b)·B_slice, diag(λ_d)·A_slice, 1). DoRA,
which rescales whole rows, is not additive and so never low-rank, though it holds A and B.

Two users read the view, so neither imports a method: the serving engine's fused multi-adapter kernel
(`deltatune.serve.fused_lora`) serves every low-rank delta at LoRA's speed in mixed batches, and
`save_as_lora` writes any adapter made only of low-rank deltas as a plain LoRA file that peft and vLLM read
(and, given a rank, LoHa's and LoKr's explicit ΔW as its truncated SVD, reporting the relative error).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn


class LowRankFactors(NamedTuple):
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float


@runtime_checkable
class LowRank(Protocol):
    additive: bool

    def low_rank_factors(self) -> LowRankFactors: ...


def low_rank_factors(delta: nn.Module) -> LowRankFactors | None:
    """The delta's (A, B, s) if it is an additive low-rank product, else None."""
    if not getattr(delta, "additive", False):
        return None
    factors = getattr(delta, "low_rank_factors", None)
    return factors() if callable(factors) else None


class LoraExport(NamedTuple):
    path: Path
    errors: dict[str, float]  # site -> ‖ΔW − s·B·A‖_F / ‖ΔW‖_F of the file (0.0 where the export is exact)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[LowRankFactors, float]:
    """The best rank-`rank` approximation of ΔW (Eckart-Young: truncated SVD, √Σ split between A and B) and its
    relative Frobenius error."""
    W = weight.detach().float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    A, B = root[:, None] * Vh[:k], U[:, :k] * root[None, :]  # (k, d_in), (d_out, k)
    norm = torch.linalg.vector_norm(S)
    error = float(torch.linalg.vector_norm(S[k:]) / norm) if norm > 0 else 0.0
    return LowRankFactors(A, B, 1.0), error


def lora_equivalent(model: nn.Module, name: str, rank: int | None = None
                    ) -> tuple[object, dict[str, LowRankFactors], dict[str, float]]:
    """(LoraConfig, logical site -> factors, site -> relative error) for adapter `name`. Low-rank deltas are
    exact; with `rank`, any other delta that has an explicit ΔW (`delta_weight()`: LoHa, LoKr) is replaced by its
    truncated SVD at that rank. Refused if a delta has neither, or the adapter owns anything else (full copies,
    parameters trained in place, a part with trainable state)."""
    from ..methods.lora import LoraConfig
    from .model import adapters

    adapter = adapters(model)[name]
    part = adapter.part(model)
    if adapter.saved or adapter.selected or (part is not None and any(True for _ in part.parameters())):
        raise ValueError(f"adapter {name!r} owns more than low-rank deltas (modules_to_save, trained biases or a "
                         "trained model-level part); a plain LoRA file cannot hold it")
    factors: dict[str, LowRankFactors] = {}
    errors: dict[str, float] = {}
    for path, delta in adapter.deltas(model):
        f, error = low_rank_factors(delta), 0.0
        if f is None and rank is not None and getattr(delta, "additive", False) and callable(getattr(delta, "delta_weight", None)):
            with torch.no_grad():
                f, error = svd_factors(delta.delta_weight(), rank)
        if f is None:
            hint = "; pass rank=k for its truncated SVD" if callable(getattr(delta, "delta_weight", None)) and rank is None else ""
            raise ValueError(f"adapter {name!r} ({adapter.config.peft_type}) has a {type(delta).__name__} at {path}, "
                             f"which is not a low-rank product{hint}")
        factors[path], errors[path] = f, error
    if not factors:
        raise ValueError(f"adapter {name!r} has no deltas to export")
    # the most common (r, s) is the config's own; the others go to rank_pattern / alpha_pattern by exact name
    ranks = {p: f.A.shape[0] for p, f in factors.items()}
    alphas = {p: f.scale * ranks[p] for p, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=_target_names(model, list(factors)),
        rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
        alpha_pattern={re.escape(p): v for p, v in alphas.items() if v != alpha},
        base_model_name_or_path=adapter.config.base_model_name_or_path, inference_mode=True,
    )
    return config, factors, errors


def _target_names(model: nn.Module, sites: list[str]) -> tuple[str, ...]:
    """The sites as a config names them: their last names (q_proj, v_proj, as peft's and vLLM's configs usually do)
    when those select exactly these sites in this model, else the full names."""
    from .adapter import logical_name

    suffixes = sorted({site.rpartition(".")[2] for site in sites})
    internal = (".deltas.", ".modules_to_save.", ".original_module")
    same = {logical_name(path) for path, _ in model.named_modules()
            if path.rpartition(".")[2] in suffixes and not any(part in path + "." for part in internal)}
    return tuple(suffixes) if same == set(sites) else tuple(sites)


def save_as_lora(model: nn.Module, path: str | os.PathLike, name: str = "default", *, rank: int | None = None
                 ) -> LoraExport:
    """Write adapter `name` as a plain LoRA file (peft's, which vLLM reads); returns (path, error per site).

    Exact for an adapter made of low-rank deltas (DyLoRA at its rank b, VeRA, AdaLoRA). With `rank`, a delta
    that is not low-rank but has an explicit ΔW (LoHa, LoKr) is written as its truncated SVD at that rank, and
    `errors` reports ‖ΔW − BA‖_F / ‖ΔW‖_F per site. A LoRA adapter is attached beside it, filled from the
    factors, saved and removed again, so the file is exactly what `save_adapter` writes for LoRA."""
    from .io import PREFIX, save_adapter, set_adapter_tensors
    from .model import active_adapters, adapters, attach, delete_adapter

    config, factors, errors = lora_equivalent(model, name, rank)
    temp = f"{name}_as_lora"
    while temp in adapters(model):
        temp += "_"
    active = active_adapters(model)
    attach(model, config, temp, activate=False)
    try:
        tensors = {}
        for site, (A, B, _) in factors.items():
            tensors[f"{PREFIX}{site}.lora_A.weight"] = A
            tensors[f"{PREFIX}{site}.lora_B.weight"] = B
        set_adapter_tensors(model, temp, tensors)
        return LoraExport(save_adapter(model, path, temp), errors)
    finally:
        delete_adapter(model, temp)
        if active and active_adapters(model) != active:
            from .model import set_active
            set_active(model, active)
