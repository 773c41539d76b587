"""Combine several adapters into one new adapter: peft's `add_weighted_adapter`, plus LoRAHub's sum of factors.

For LoRA adapters i = 1..K with factors Aᵢ (r, d_in), Bᵢ (d_out, r), scales sᵢ and weights wᵢ, per module:

    cat          A = [A₁; …; A_K], B = [w₁s₁B₁ … w_Ks_KB_K]    ΔW = Σ wᵢsᵢBᵢAᵢ exactly, rank Σ rᵢ
    linear       A = Σ √(wᵢsᵢ)Aᵢ, B = Σ √(wᵢsᵢ)Bᵢ               ΔW = (Σ√(wᵢsᵢ)Bᵢ)(Σ√(wᵢsᵢ)Aᵢ): cross terms BᵢAⱼ
    ties, dare_linear, dare_ties, magnitude_prune            the same, each factor merged by that rule
    svd          ΔW = Σ wᵢsᵢBᵢAᵢ, then B = U_k·diag(S_k), A = V_kᵀ (rank k = svd_rank, optional clamp)
    ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd   the rule on the ΔWᵢ, then the SVD
    lorahub      A = Σ wᵢAᵢ, B = Σ wᵢBᵢ, scale s                 ΔW = s·B̂Â (LoRAHub, Huang et al. 2023, 2307.13269)

The results of cat, linear, svd and the pruning rules have scale 1 (lora_alpha = r), as peft writes them; the
rules themselves are in `merge_ops`. For IA3 adapters the only combination is linear, l = Σ wᵢlᵢ (peft's).

Decisions, each with its reason:
- A module that only some adapters adapt takes only theirs (cat: a zero block for the others), as peft does.
- Negative weights (task negation) are accepted by cat, svd and lorahub, where they negate ΔWᵢ exactly; the
  factor-wise rules take √(wᵢsᵢ) of both factors, which has no real value for wᵢ < 0 (peft 0.21 puts the
  sign on A only, which flips the sign of the cross terms too), and IA3 multiplies activations, so a
  negative weight flips them instead of removing a task: refused.
- DoRA is refused: its magnitude vector divides by the row norms of that adapter's own W + sBA, so a
  weighted sum of (m, A, B) has no exact rule and any choice silently changes the result; merge each DoRA
  into its own model copy instead. Embedding LoRA, modules_to_save, trained biases and mixed methods are
  refused too (a combined copy of a full module has no meaning).
- One adapter is combined as asked (peft silently switches to linear).
- A random rule (DARE) with `seed` draws from its own generator: the same seed gives the same adapter
  without touching the global RNG; seed None draws from the global RNG, as peft does.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..core.adapter import logical_name
from ..core.io import PREFIX, load_adapter, set_adapter_tensors
from ..core.model import active_adapters, adapters as attached, attach, delete_adapter, set_active
from ..methods.ia3 import IA3Config
from ..methods.lora import LoraConfig
from .merge_ops import merge_tensors

LORA_TYPES = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd", "lorahub")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")
NEGATIVE_OK = ("cat", "svd", "lorahub")


class CombineError(ValueError):
    """Adapters or settings that cannot be combined; nothing was changed."""


@dataclass
class Source:
    """One adapter to combine: its name on the model and its deltas by logical module name."""
    name: str
    config: object
    deltas: dict[str, nn.Module]


def combine_adapters(
    model: nn.Module,
    adapters: Sequence[str | os.PathLike],
    weights: Sequence[float],
    name: str,
    *,
    combination_type: str | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
    activate: bool = False,
) -> nn.Module:
    """Attach adapter `name` combining `adapters` (attached names or saved adapter directories) with `weights`.

    combination_type: one of LORA_TYPES for LoRA (default "svd", peft's), "linear" for IA3 (the default).
    svd_rank: rank of an *svd result (default: the largest input rank); svd_clamp: quantile in (0, 1] at
    which the SVD factors are clamped (peft's). density: the kept fraction for the pruning rules, in [0, 1];
    majority_sign_method: "total" or "frequency" (TIES' sign election). seed: DARE's random drop.
    The result is an ordinary adapter (saved in peft's format, mergeable, servable); it is left inactive
    unless `activate`. Every check runs before the model changes; saved adapters are loaded for the call
    and removed again.
    """
    if name in attached(model):
        raise CombineError(f"an adapter named {name!r} is already attached; delete it first or pick another name")
    active = active_adapters(model)
    with _sources(model, adapters) as sources:
        kind, config, tensors_for = _plan(model, sources, weights, combination_type, svd_rank=svd_rank,
                                          svd_clamp=svd_clamp, density=density,
                                          majority_sign_method=majority_sign_method)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tensors = tensors_for(weights, generator=generator, full_matrices=svd_full_matrices)
        with torch.random.fork_rng(devices=[]):  # the result's initial values are overwritten: draw nothing globally
            attach(model, config, name, activate=False)
        try:
            set_adapter_tensors(model, name, tensors)
        except BaseException:
            delete_adapter(model, name)
            raise
    if activate:
        set_active(model, name)
    elif active and active_adapters(model) != active:
        set_active(model, active)
    return model


@contextmanager
def _sources(model: nn.Module, specs: Sequence[str | os.PathLike]) -> Iterator[list[Source]]:
    """The adapters to combine; directories are loaded under temporary names and removed afterwards."""
    if isinstance(specs, (str, os.PathLike)) or not len(specs):
        raise CombineError(f"adapters must be a non-empty list of adapter names or directories, got {specs!r}")
    loaded: list[str] = []
    active = active_adapters(model)
    try:
        names = []
        for spec in specs:
            if isinstance(spec, str) and spec in attached(model):
                names.append(spec)
                continue
            if not Path(spec).is_dir():
                raise CombineError(f"{spec!r} is neither an attached adapter ({sorted(attached(model)) or 'none'}) "
                                   "nor an adapter directory")
            temp = f"_combine_input_{len(loaded)}"
            while temp in attached(model):
                temp += "_"
            load_adapter(model, spec, temp, activate=False)
            loaded.append(temp)
            names.append(temp)
        yield [Source(n, attached(model)[n].config, dict(attached(model)[n].deltas(model))) for n in names]
    finally:
        for temp in loaded:
            delete_adapter(model, temp)
        if loaded and active and active_adapters(model) != active:
            set_active(model, active)


def _check_weights(weights: Sequence[float], n: int, kind: str) -> list[float]:
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != n:
        raise CombineError(f"weights must give one number per adapter ({n} adapters), got {weights!r}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise CombineError(f"weights must be finite numbers, got {bad[0]!r} in {list(weights)}")
    if kind not in NEGATIVE_OK and any(w < 0 for w in weights):
        raise CombineError(
            f"combination_type={kind!r} takes no negative weight (got {list(weights)}): it scales both factors by "
            "√(w·s), which has no real value for w < 0. Use 'cat' or 'svd' for task negation (ΔW·w exactly)")
    return [float(w) for w in weights]


def _plan(model, sources, weights, kind, *, svd_rank, svd_clamp, density, majority_sign_method):
    """Validate everything; return (kind, config of the result, weights -> on-disk tensors)."""
    types = {s.config.peft_type for s in sources}
    if len(types) != 1:
        raise CombineError(f"all adapters must be of one method to combine, got {sorted(types)}")
    bases = {s.config.base_model_name_or_path for s in sources} - {None}
    if len(bases) > 1:
        raise CombineError(f"the adapters were trained for different base models ({sorted(bases)}); their deltas "
                           "do not add up on one base")
    for s in sources:
        adapter = attached(model)[s.name]
        if adapter.saved or adapter.selected or adapter.part(model) is not None:
            raise CombineError(f"adapter {s.name!r} owns more than deltas at modules (modules_to_save, trained biases "
                               "or a model-level part), which has no weighted combination")
    peft_type = types.pop()
    order = {logical_name(p): i for i, (p, _) in enumerate(model.named_modules())}
    sites = sorted({p for s in sources for p in s.deltas}, key=lambda p: order.get(p, len(order)))
    base = next(iter(bases), None)
    if peft_type == "IA3":
        kind = kind or "linear"
        if kind != "linear":
            raise CombineError(f"IA3 adapters combine only linearly (l = Σ wᵢlᵢ), got combination_type={kind!r}")
        _check_weights(weights, len(sources), kind)
        return kind, *_ia3_plan(sources, sites, base)
    if peft_type != "LORA":
        raise CombineError(f"combining {peft_type} adapters is not supported: only LoRA (peft's add_weighted_adapter "
                           "types and LoRAHub) and IA3 (linear) have a defined combination")
    if any(getattr(s.config, "use_dora", False) for s in sources):
        raise CombineError("DoRA adapters cannot be combined: the magnitude vector divides by the row norms of each "
                           "adapter's own W + s·B·A, so a weighted sum of (m, A, B) has no exact rule; merge each into "
                           "its own model copy instead")
    kind = kind or "svd"
    if kind not in LORA_TYPES:
        raise CombineError(f"combination_type must be one of {', '.join(LORA_TYPES)}; got {kind!r}")
    _check_weights(weights, len(sources), kind)
    if kind in NEEDS_DENSITY and (isinstance(density, bool) or not isinstance(density, (int, float))
                                  or not 0 <= density <= 1):
        raise CombineError(f"combination_type={kind!r} needs density, the kept fraction in [0, 1]; got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise CombineError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    factors = {s.name: {p: _lora_factors(s, p, d) for p, d in s.deltas.items()} for s in sources}
    ranks = {n: max(A.shape[0] for A, _, _ in f.values()) for n, f in factors.items()}
    if kind in ("linear", "lorahub") or (kind in NEEDS_DENSITY and not kind.endswith("svd")):
        every = {A.shape[0] for f in factors.values() for A, _, _ in f.values()}
        if len(every) != 1:
            raise CombineError(f"combination_type={kind!r} needs one rank r for every adapter and module, got ranks "
                               f"{sorted(every)}; use 'cat' (rank Σ r) or 'svd' (any rank)")
    if kind == "lorahub":
        scales = {s for f in factors.values() for _, _, s in f.values()}
        if len(scales) != 1:
            raise CombineError(f"lorahub sums the factors, so every adapter needs one scale α/r; got {sorted(scales)}")
        rank, alpha = ranks[sources[0].name], scales.pop() * ranks[sources[0].name]
    elif kind == "cat":
        rank = alpha = sum(ranks.values())
    elif kind.endswith("svd"):
        rank = alpha = _svd_rank(svd_rank, ranks, factors, svd_clamp)
    else:
        rank = alpha = ranks[sources[0].name]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=tuple(sites), base_model_name_or_path=base,
                        inference_mode=True)

    def tensors_for(w, *, generator=None, full_matrices=True):
        w = _check_weights(w, len(sources), kind)
        out = {}
        for site in sites:
            present = [(s.name, wi) for s, wi in zip(sources, w) if site in factors[s.name]]
            A, B = _combine_site(kind, [factors[n][site] for n, _ in present], [wi for _, wi in present],
                                 [n for n, _ in present], ranks, generator=generator, density=density,
                                 sign=majority_sign_method, rank=rank, clamp=svd_clamp, full_matrices=full_matrices)
            out[f"{PREFIX}{site}.lora_A.weight"], out[f"{PREFIX}{site}.lora_B.weight"] = A, B
        return out

    return kind, config, tensors_for


def _lora_factors(source: Source, path: str, delta: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) of a LoRA delta on a linear layer, read from its file tensors."""
    tensors = delta.tensors()
    if set(tensors) != {"lora_A.weight", "lora_B.weight"}:
        raise CombineError(f"adapter {source.name!r} has a {type(delta).__name__} at {path} (tensors {sorted(tensors)}); "
                           "only LoRA on linear layers is combined (embedding LoRA is not supported yet)")
    return tensors["lora_A.weight"].detach(), tensors["lora_B.weight"].detach(), float(delta.scaling)


def _svd_rank(svd_rank, ranks, factors, clamp) -> int:
    rank = max(ranks.values()) if svd_rank is None else svd_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CombineError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    smallest = min(min(A.shape[1], B.shape[0]) for f in factors.values() for A, B, _ in f.values())
    if rank > smallest:
        raise CombineError(f"svd_rank={rank} exceeds the smallest adapted layer's dimension ({smallest})")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp <= 1):
        raise CombineError(f"svd_clamp must be a quantile in (0, 1], got {clamp!r}")
    return rank


def _combine_site(kind, parts, w, names, ranks, *, generator, density, sign, rank, clamp, full_matrices):
    """(A, B) of the result at one module from the present adapters' (A, B, s)."""
    if kind == "cat":  # one block of width ranks[n] per adapter, in the given order (the server's layout)
        return _cat(parts, w, names, ranks)
    if kind == "lorahub":
        return sum(wi * A for (A, _, _), wi in zip(parts, w)), sum(wi * B for (_, B, _), wi in zip(parts, w))
    if kind.endswith("svd"):
        weights = torch.tensor(w)
        deltas = [(B @ A) * s for A, B, s in parts]
        delta = merge_tensors(kind.removesuffix("_svd"), deltas, weights, density=density,
                              majority_sign_method=sign, generator=generator)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
        U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
        if clamp is not None:
            high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
            U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
        return Vh, U
    root = torch.tensor([math.sqrt(wi * s) for (_, _, s), wi in zip(parts, w)])
    rule = "linear" if kind == "linear" else kind
    A = merge_tensors(rule, [A for A, _, _ in parts], root, density=density, majority_sign_method=sign, generator=generator)
    B = merge_tensors(rule, [B for _, B, _ in parts], root, density=density, majority_sign_method=sign, generator=generator)
    return A, B


def _cat(parts, w, names, ranks):
    A0, B0, _ = parts[0]
    order = list(ranks)  # every adapter keeps its block, present at this module or not
    total = sum(ranks.values())
    A = A0.new_zeros(total, A0.shape[1])
    B = B0.new_zeros(B0.shape[0], total)
    present = dict(zip(names, zip(parts, w)))
    start = 0
    for n in order:
        if n in present:
            (An, Bn, s), wi = present[n]
            A[start: start + An.shape[0]] = An
            B[:, start: start + An.shape[0]] = Bn * (wi * s)
        start += ranks[n]
    return A, B


def _ia3_plan(sources, sites, base):
    ff = [p for p in sites if any(p in s.deltas and s.deltas[p].is_feedforward for s in sources)]
    clash = [p for p in sites if len({s.deltas[p].is_feedforward for s in sources if p in s.deltas}) > 1]
    if clash:
        raise CombineError(f"IA3 adapters disagree on whether {clash[0]} scales its input or its output")
    config = IA3Config(target_modules=tuple(sites), feedforward_modules=tuple(ff), base_model_name_or_path=base,
                       inference_mode=True)

    def tensors_for(w, *, generator=None, full_matrices=True):
        w = _check_weights(w, len(sources), "linear")
        out = {}
        for site in sites:
            present = [(s.deltas[site].ia3_l.detach(), wi) for s, wi in zip(sources, w) if site in s.deltas]
            out[f"{PREFIX}{site}.ia3_l"] = sum(wi * l for l, wi in present)
        return out

    return config, tensors_for
