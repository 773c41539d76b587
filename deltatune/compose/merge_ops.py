"""Task-vector merging rules over stacked tensors (TIES, DARE, magnitude pruning), as peft names them.

Each rule takes K task tensors t₁..t_K of one shape and their weights w₁..w_K and returns one tensor:

    task_arithmetic   Σ wᵢ tᵢ                                   (Ilharco et al. 2023, 2212.04089)
    magnitude_prune   Σ wᵢ top_d(tᵢ)                            top_d keeps the ⌊d·n⌋ largest |values|
    ties              Σ_{i: sign agrees} wᵢ top_d(tᵢ) / #agree  (Yadav et al. 2023, 2306.01708)
    dare_linear       Σ wᵢ (mᵢ ⊙ tᵢ)/d, mᵢ ~ Bernoulli(d)       (Yu et al. 2024, 2311.03099)
    dare_ties         ties with DARE's random pruning

The elected sign of an entry is that of Σᵢ tᵢ over the pruned, unweighted tensors ("total") or of the count of
positive minus negative entries ("frequency"); an entry with no agreeing tensor is 0. These follow
peft.utils.merge_utils exactly (tests compare them on the same tensors and seed); the one addition is an
optional `generator`, so a merge with a seed is reproducible without touching the global RNG.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

SignMethod = Literal["total", "frequency"]


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(K, ...) tensors times (K,) weights broadcast over the trailing dimensions."""
    return tensors * weights.to(tensors.dtype).view(weights.shape + (1,) * (tensors.dim() - 1))


def magnitude_mask_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of largest magnitude, zero the rest."""
    flat = tensor.reshape(-1)
    keep = torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices
    mask = torch.zeros_like(flat)
    mask[keep] = 1
    return tensor * mask.view(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float, *, rescale: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE's drop), divided by `density` when `rescale`."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], *, rescale: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Prune to `density` (density >= 1 keeps everything, as in peft)."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if method == "magnitude":
        return magnitude_mask_prune(tensor, density)
    return random_prune(tensor, density, rescale=rescale, generator=generator)


def majority_sign_mask(tensors: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """(K, ...) bool: whether each entry has the elected sign (ties break towards +)."""
    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors that agree with the elected sign (an entry none agrees with stays 0)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors])
    return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign_method))


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    return task_arithmetic([prune(t, density, "random", rescale=True, generator=generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: SignMethod = "total", *, generator: torch.Generator | None = None) -> torch.Tensor:
    stacked = torch.stack([prune(t, density, "random", rescale=True, generator=generator) for t in tensors])
    return disjoint_merge(_weighted(stacked, weights), majority_sign_mask(stacked, majority_sign_method))


def merge_tensors(rule: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, *, density: float | None = None,
                  majority_sign_method: SignMethod = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the rule named by a combination type's stem ("linear"/"svd" -> task arithmetic, "ties", ...)."""
    if rule in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if rule == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if rule == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if rule == "dare_linear":
        return dare_linear(tensors, weights, density, generator=generator)
    if rule == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method, generator=generator)
    raise ValueError(f"unknown merge rule {rule!r}")
