"""Full fine-tuning as a method: every parameter of the base model trained in place (`peft_type: "FULL"`).

    W ← W − lr·Adam(∇W)   for every W of the model (or of the modules named in target_modules)

The baseline that "LoRA Without Regret" (Schulman and Thinking Machines, 2025) compares LoRA against: LoRA's
optimal learning rate is about 10× full fine-tuning's, and high-rank LoRA tracks full fine-tuning's loss curve
on small and medium post-training sets. As an adapter it goes through the same code as every other method
(`deltatune train --adapter.peft_type FULL`), so the comparison changes one flag.

It uses the core's selection mechanism (`register(..., select=...)`): the core snapshots each selected
parameter's original value and puts it back on `delete_adapter`, inside `disable_adapters` and whenever the
adapter is inactive, so the model holds its weights twice (the originals on the side). The adapter file is
peft's two files with `peft_type: "FULL"` and every trained tensor under its own name, which peft refuses to
load; only deltatune reads it (load it onto the same base model). Nothing to merge: the weights are the model.
Trained in place, it cannot differ per row of a mixed batch (`deltatune.route` refuses it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from torch import nn

from ..core.config import AdapterConfig
from ..core.registry import register
from ..core.sites import ModulesToSave, Site
from ..core.targets import find_targets

# Modules of other adapters, never the base model's: sites' deltas, modules_to_save copies and originals, parts.
_ADAPTER_INTERNALS = {"deltas", "modules_to_save", "original_module", "deltatune_parts"}


@dataclass(frozen=True)
class FullConfig(AdapterConfig):
    """Full fine-tuning: every parameter, or every parameter inside the modules named in target_modules.

    target_modules: None (default) trains the whole model, embeddings and norms included; a list, regex or
        "all-linear" trains the parameters inside the matching modules only (e.g. ["mlp"]).

    Recommended learning rate: ~1e-5 for LLM post-training, a tenth of LoRA's ("LoRA Without Regret": LoRA's
    optimum is ~10× full fine-tuning's); 2e-5 to 5e-5 for BERT-size encoders.
    """

    peft_type: ClassVar[str] = "FULL"
    recommended_lr: ClassVar[float] = 2e-5  # about LoRA's / 10 ("LoRA Without Regret")


def base_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the logical name of its module, for every parameter of the base model.

    Other adapters' tensors are left out; a parameter inside a site is named by the module the site wraps
    (`q_proj.base_layer.bias` belongs to `q_proj`). Tied tensors appear once (named_parameters' rule).
    """
    sites = {path for path, module in model.named_modules() if isinstance(module, Site)}
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")[:-1]
        if not _ADAPTER_INTERNALS.isdisjoint(parts):
            continue
        logical = [p for i, p in enumerate(parts) if not (p == "base_layer" and ".".join(parts[:i]) in sites)]
        out[name] = ".".join(logical)
    return out


def _base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(logical name, module) of the base model's modules; a site stands for the module it wraps."""
    seen: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if not path or not _ADAPTER_INTERNALS.isdisjoint(parts):
            continue
        logical = ".".join(p for i, p in enumerate(parts) if not (
            p == "base_layer" and isinstance(model.get_submodule(".".join(parts[:i])), Site)))
        base = module.base_layer if isinstance(module, (Site, ModulesToSave)) else module
        seen.setdefault(logical, base)
    return list(seen.items())


def parameters_in_targets(model: nn.Module, config: AdapterConfig, keep=lambda name: True) -> list[str]:
    """Names of the base parameters inside the modules config.target_modules selects (all of them when None),
    outside modules_to_save, for which `keep(name)` holds. Raises TargetNotFoundError when target_modules
    matches no module."""
    saved = config.modules_to_save or ()  # trained as the adapter's own copies, never in place (as in find_targets)
    params = {name: module for name, module in base_parameters(model).items()
              if keep(name) and not any(f".{m}." in f".{module}." for m in saved)}
    if config.target_modules is None:
        return list(params)
    targets = find_targets(model, config, lambda module: True, _base_modules(model))
    return [n for n, module in params.items() if any(module == t or module.startswith(t + ".") for t in targets)]


def every_parameter(model: nn.Module, config: FullConfig, sites: Sequence[str]) -> list[str]:
    return parameters_in_targets(model, config)


register(FullConfig, select=every_parameter, readers=("deltatune",))
