"""An attached adapter: everything one named adapter owns in a model, and how it is taken out again.

    deltas     one Delta per site it targets          (LoRA's A and B, IA3's vectors, a bottleneck adapter)
    saved      full copies in ModulesToSave wrappers   (a classification head)
    selected   existing parameters trained in place    (BitFit's biases, full fine-tuning, LoRA bias="all"),
               with a snapshot of their original values, swapped back in whenever the adapter is inactive
    part       a model-level module                   (prompt tuning's virtual tokens)

The adapter answers for all of them: its file tensors, its parameters, their trainability, and its removal.
Tensors are found from the model each time (by site path), so the model stays the one owner of modules.
A delta's persistent buffers are tensors the adapter owns and saves but never trains (ReLoRA's merged delta).

Its config may change after attach only through `update_config`, in the fields the config class declares
`updatable_fields` (AdaLoRA's rank_pattern, set as its budget is allocated), validated like a new config and
by the method's `check_update` against the live adapter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .config import AdapterConfig, ConfigError
from .registry import Method
from .sites import BlockSite

PARTS_ATTR = "deltatune_parts"  # root-level nn.ModuleDict: adapter name -> injected part


@dataclass
class Adapter:
    name: str
    config: AdapterConfig
    method: Method
    # logical paths (as if no block site wrapped anything; see `resolve`) of the Sites holding this adapter's
    # deltas and of its ModulesToSave wrappers: another adapter wrapping an enclosing block does not move them
    sites: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    # file key (the parameter's name when selected) -> (parameter, its original value)
    selected: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    stash: dict[str, torch.Tensor] | None = None  # trained values of `selected` while the adapter is swapped out

    # ---- what it owns -----------------------------------------------------------------------------
    def part(self, model: nn.Module) -> nn.Module | None:
        parts = getattr(model, PARTS_ATTR, None)
        return parts[self.name] if parts is not None and self.name in parts else None

    def deltas(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for path in self.sites:
            yield path, model.get_submodule(resolve(model, path)).deltas[self.name]

    def tensors(self, model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        """On-disk key -> live tensor: everything the adapter file holds, and nothing else."""
        out: dict[str, torch.Tensor] = {}
        for path, delta in self.deltas(model):
            out.update({f"{prefix}{path}.{key}": t for key, t in delta.tensors().items()})
        for path in self.saved:
            copy = model.get_submodule(resolve(model, path)).modules_to_save[self.name]
            out.update({f"{prefix}{path}.{key}": t for key, t in copy.state_dict(keep_vars=True).items()})
        out.update({f"{prefix}{name}": param for name, (param, _) in self.selected.items()})
        part = self.part(model)
        if part is not None:
            out.update(part.tensors())
        return out

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for tensor in self.tensors(model).values():
            if isinstance(tensor, nn.Parameter):
                seen.setdefault(id(tensor), tensor)
        part = self.part(model)
        for param in part.parameters() if part is not None else ():
            seen.setdefault(id(param), param)
        return list(seen.values())

    def in_place(self) -> bool:
        """Whether the adapter changes base parameters in place (then it cannot be mixed per row)."""
        return bool(self.selected)

    # ---- selected parameters: originals in place whenever the adapter is not active ---------------
    def swap_out(self, model: nn.Module) -> None:
        if not self.selected or self.stash is not None:
            return
        with torch.no_grad():
            self.stash = {name: param.detach().clone() for name, (param, _) in self.selected.items()}
            for param, original in self.selected.values():
                param.copy_(original)

    def swap_in(self, model: nn.Module) -> None:
        if self.stash is None:
            return
        with torch.no_grad():
            for name, value in self.stash.items():
                self.selected[name][0].copy_(value)
        self.stash = None

    # ---- removal ------------------------------------------------------------------------------------
    def remove(self, model: nn.Module) -> None:
        """Take every part of the adapter out of `model`; hosts left empty give back their base module."""
        self.swap_out(model)
        self.stash, self.selected = None, {}
        for path in self.sites + self.saved:
            path = resolve(model, path)
            host = model.get_submodule(path)
            host.remove(self.name)
            if not host.adapter_names:
                replace_module(model, path, host.base_layer)
        self.sites, self.saved = [], []
        parts = getattr(model, PARTS_ATTR, None)
        if parts is not None and self.name in parts:
            parts[self.name].remove(model)
            del parts[self.name]
            if not len(parts):
                delattr(model, PARTS_ATTR)


def update_config(model: nn.Module, name: str, **changes) -> AdapterConfig:
    """Change fields of attached adapter `name`'s config, validated before anything changes; returns the new
    config (what `adapter_configs` and the saved file then hold). Only the config class's `updatable_fields`
    may change: the others fixed the shapes and targets at attach."""
    from .model import adapters  # model.py imports this module

    found = adapters(model)
    if name not in found:
        raise KeyError(f"no adapter named {name!r}; attached adapters: {sorted(found) or 'none'}")
    adapter = found[name]
    allowed = tuple(getattr(type(adapter.config), "updatable_fields", ()))
    refused = sorted(set(changes) - set(allowed))
    if refused:
        raise ConfigError(f"{refused[0]} of adapter {name!r} cannot change after attach ({type(adapter.config).__name__} "
                          f"allows {', '.join(allowed) or 'no field'}); attach a new adapter with the value instead")
    new = adapter.config.replace(**changes)  # the config's own validation, naming the field
    if adapter.method.check_update is not None:
        adapter.method.check_update(model, adapter, new)
    adapter.config = new
    return new


def logical_name(path: str) -> str:
    """A module's name as if no block site had wrapped it (`a.base_layer.b` -> `a.b`); file keys use it."""
    return path.replace(".base_layer.", ".")


def resolve(model: nn.Module, logical: str) -> str:
    """The current module path of a logical name: each block site on the way adds its `.base_layer`."""
    module, parts = model, []
    for atom in logical.split("."):
        if isinstance(module, BlockSite) and atom not in ("base_layer", "deltas"):
            module, parts = module.base_layer, parts + ["base_layer"]
        module = getattr(module, atom)
        parts.append(atom)
    return ".".join(parts)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_part(model: nn.Module, name: str, part: nn.Module) -> None:
    if not hasattr(model, PARTS_ATTR):
        model.add_module(PARTS_ATTR, nn.ModuleDict())
    getattr(model, PARTS_ATTR)[name] = part
