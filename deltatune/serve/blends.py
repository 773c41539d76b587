"""Blends: a request's {adapter: weight} served as one LoRA adapter, Σ wᵢ·ΔWᵢ (the registry builds and caches
them; the server checks a request's weights with `check_weights`)."""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

from torch import nn

from ..compose.combine import combine_adapters
from ..core.model import adapters as attached_adapters
from ..methods.lora import LoraLinear
from .sampling import RequestError


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """A blend's {adapter: weight}, sorted by name, weights as floats; RequestError (400) naming the field."""
    if not weights or not all(isinstance(k, str) for k in weights):
        raise RequestError("a blend names one or more adapters with weights, e.g. {\"a\": 0.7, \"b\": 0.3}", param="adapters")
    bad = [k for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise RequestError(f"blend weight of {bad[0]!r} must be a number (and finite), got {weights[bad[0]]!r}",
                           param="adapters")
    return {k: float(weights[k]) for k in sorted(weights)}


def blend_name(weights: Mapping[str, float]) -> str:
    """The public name of a blend: the same weights give the same name (so the blend is built once)."""
    text = "+".join(f"{k}:{float(v)!r}" for k, v in sorted(weights.items()))
    return "blend_" + hashlib.sha1(text.encode()).hexdigest()[:12]


def blend_lora(model: nn.Module, weights: Mapping[str, float], name: str,
               labels: Mapping[str, str] | None = None) -> str:
    """Attach `name`: the LoRA adapter whose delta is Σ wᵢ·ΔWᵢ of the attached LoRA adapters `weights` names.

    Exact, not an approximation: at every site ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ … wₖsₖBₖ]·[A₁; …; Aₖ], so the
    blend is one LoRA of rank Σ rᵢ (scale 1) with the A's stacked and the scaled B's side by side (LoRAX's
    linear merge). Sites that only some adapters target get zero blocks for the others. LoRA only: DoRA and
    IA3 are not linear in their parameters. `labels` names adapters in errors (attached -> public name).
    Built by `deltatune.compose.combine_adapters(..., combination_type="cat")`, the one implementation.
    """
    labels = labels or {}
    attached = attached_adapters(model)
    missing = [n for n in weights if n not in attached]
    if missing:
        raise RequestError(f"blend names {labels.get(missing[0], missing[0])!r}, which is not loaded", param="adapters",
                           status=404)
    for adapter_name in weights:
        adapter = attached[adapter_name]
        deltas = dict(adapter.deltas(model))
        plain = adapter.config.peft_type == "LORA" and not getattr(adapter.config, "use_dora", False)
        if not plain or adapter.saved or adapter.selected or adapter.part(model) is not None or \
                not all(type(d) is LoraLinear for d in deltas.values()):
            raise RequestError(f"only plain LoRA adapters on linear layers can be blended; "
                               f"{labels.get(adapter_name, adapter_name)!r} is "
                               f"{adapter.config.peft_type} with other parts", param="adapters")
    combine_adapters(model, list(weights), list(weights.values()), name, combination_type="cat")  # compose's cat
    return name
