"""Folding adapters into the base weights and taking them out: merge, unmerge, unload, merge_and_unload.

Every operation here is all or nothing: `merge` checks every site first (each delta mergeable, the stack order
kept, the base not quantized) and, with `safe=True`, computes every merged weight and checks it for NaN/Inf
before writing the first. Merged weights are explicit state, read by `core/model.py` (changing the active set
unmerges first; `disable_adapters` is refused while anything is merged). The deltas' own algebra (merge and
unmerge of one (W, b)) is theirs (`Delta`); the sites fold them in attach order (`WeightSite`).
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import nn

from .adapter import PARTS_ATTR, replace_module
from .delta import NotMergeableError
from .sites import ModulesToSave, Site, WeightSite, hosts
from .state import ACTIVE_ATTR, STATE_ATTR, active_adapters, adapters, require_attached


def merge(model: nn.Module, names: Sequence[str] | None = None, *, safe: bool = True) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights. Idempotent; all sites or none.

    Every site is checked first (each delta mergeable, the stack order kept, the base not quantized); with
    `safe=True` (the default) every merged weight is also computed and checked for NaN/Inf before any is written.
    Adapters without deltas (prompt tuning) or trained in place (BitFit) have nothing to fold and are skipped.
    """
    names = active_adapters(model) if names is None else list(names)
    require_attached(model, names)
    for _, site in _check_all(model, names, safe=safe, in_place=True):
        site.merge(names)
    return model


def _check_all(model: nn.Module, names: list[str], *, safe: bool, in_place: bool) -> list[tuple[str, Site]]:
    """The sites holding any of `names`, each checked for a merge; raises before anything is written."""
    sites = [(p, h) for p, h in hosts(model) if isinstance(h, Site) and set(names) & set(h.adapter_names)]
    for path, site in sites:
        try:
            new = site.check_merge(names, in_place=in_place)
            if safe and new:
                with torch.no_grad():
                    if not all(torch.isfinite(t).all() for t in site.merged_value(new) if t is not None):
                        raise ValueError(f"merging would write NaN/Inf into {path}; nothing was changed")
        except NotMergeableError as exc:
            raise type(exc)(f"cannot merge at {path}: {exc}; nothing was changed") from None
    return sites


def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge, restoring the base weights."""
    for _, host in hosts(model):
        if isinstance(host, WeightSite):
            host.unmerge()
    return model


def unload(model: nn.Module, *, merge_active: bool = False, safe: bool = True) -> nn.Module:
    """Remove every adapter and return the plain base model (merging the active adapters first if asked).

    A quantized base comes back, when merged, as dequantized Linear layers holding the merged weights.
    """
    active = active_adapters(model)
    if merge_active:
        with_part = [n for n in active if any(True for _ in (adapters(model)[n].part(model) or nn.Module()).parameters())]
        if with_part:  # its virtual tokens would be silently lost in a plain model (frozen buffers, as VeRA's, are not)
            adapter = adapters(model)[with_part[0]]
            raise NotMergeableError(
                f"adapter {adapter.name!r} ({adapter.config.peft_type}) has no weights to fold into the model, and a plain "
                "model cannot carry it; serve the base with the adapter loaded instead; nothing was changed"
            )
        _check_all(model, active, safe=safe, in_place=False)
    else:
        unmerge(model)
    for path, host in sorted(hosts(model), key=lambda item: -item[0].count(".")):  # innermost first
        if isinstance(host, ModulesToSave):
            keep = next((n for n in active if n in host.modules_to_save), None) if merge_active else None
            replace_module(model, path, host.modules_to_save[keep] if keep else host.original_module)
        elif isinstance(host, WeightSite) and merge_active:
            replace_module(model, path, host.unwrapped([n for n in active if n in host.adapter_names]))
        else:
            replace_module(model, path, host.base_layer)
    for adapter in adapters(model).values():
        if not (merge_active and adapter.name in active):
            adapter.swap_out(model)
        part = adapter.part(model)
        if part is not None:
            part.remove(model)
    for attr in (STATE_ATTR, ACTIVE_ATTR, PARTS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(True)
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = True) -> nn.Module:
    """Merge the active adapters and return the base model with no adapter modules: zero added latency.

    Biases the merge added to a bias-free model (BitFit on Llama) are declared in its config
    (`declare_added_biases`), so `save_pretrained` writes a model that `from_pretrained` loads with them.
    """
    merged = unload(model, merge_active=True, safe=safe)
    try:
        declare_added_biases(merged)
    except NotMergeableError as exc:  # the merged model computes correctly; only a save would lose the biases
        warnings.warn(f"{exc}; the merged model computes with them, but a saved copy would load without them",
                      stacklevel=2)
    return merged


def declare_added_biases(model: nn.Module) -> list[str]:
    """Make the config of a transformers model declare the biases a merge added (BitFit on a bias-free Llama:
    q_proj.bias ...), so `from_pretrained` builds and loads them instead of dropping them: each `*_bias` flag of
    the config that is false is set where that makes the architecture have the added biases; biases a flag
    implies that the merge did not add are written as zeros (the same function). Raises NotMergeableError if no
    flag declares them. Returns the flags set (none for a model that is not a transformers model)."""
    if not hasattr(type(model), "_from_config") or getattr(model, "config", None) is None:
        return []

    def keys(config) -> set[str]:
        with torch.device("meta"):
            return set(type(model)._from_config(config).state_dict())

    have = set(model.state_dict())
    added = {k for k in have - keys(model.config) if k.endswith(".bias")}
    if not added:
        return []
    config, flags = copy.deepcopy(model.config), []
    for flag in [k for k, v in vars(model.config).items() if k.endswith("_bias") and v is False]:
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        if keys(trial) & added:
            config, flags = trial, flags + [flag]
    missing = added - keys(config)
    if missing:
        raise NotMergeableError(
            f"the merged model has biases its architecture cannot declare ({sorted(missing)[0]} ...); "
            f"{type(model).__name__}'s config has no flag for them, and transformers would drop them on load")
    for name in sorted(keys(config) - have):  # biases a flag implies that the merge did not add: zeros
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "bias" and getattr(module, "bias", 0) is None and hasattr(module, "out_features"):
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                   device=module.weight.device), requires_grad=False)
    for flag in flags:
        setattr(model.config, flag, True)
    return flags

