"""Model-level operations: attach, activate, disable, route, merge, unload. Generic over methods.

deltatune changes the user's model in place (a targeted `nn.Linear` becomes an adapter layer wrapping it), so
the model keeps its class, its `generate`, and its state-dict keys for every base weight. The adapters'
configs live on the root module in `model.deltatune_adapters` (name -> config).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import AdapterConfig, ConfigError
from .layer import AdapterLayer, ModulesToSave, routing
from .registry import method_of
from .targets import find_modules_to_save, find_targets

STATE_ATTR = "deltatune_adapters"
ACTIVE_ATTR = "deltatune_active"


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, (AdapterLayer, ModulesToSave))


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """name -> config of every adapter attached to `model` (empty if none)."""
    return getattr(model, STATE_ATTR, {})


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, ACTIVE_ATTR, []))


def wrappers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer | ModulesToSave]]:
    """(module name, wrapper) for every adapter layer and modules_to_save wrapper."""
    for name, module in model.named_modules():
        if _is_wrapper(module):
            yield name, module  # type: ignore[misc]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_name(model: nn.Module, name: str) -> None:
    if not name or "." in name or not name.isidentifier():
        raise ValueError(f"adapter name {name!r} must be a non-empty Python identifier without dots, e.g. 'default'")
    if name in adapter_configs(model):
        raise ValueError(f"an adapter named {name!r} is already attached; delete it first or pick another name")


def _require(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_configs(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {', '.join(map(repr, unknown))}; attached adapters: {sorted(known) or 'none'}")


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Add adapter `name` described by `config` to `model` (in place) and return the model.

    Every base parameter is frozen; the active adapters' parameters are trainable. If anything fails, the
    model is left exactly as it was.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig such as deltatune.LoraConfig, got {type(config).__name__}")
    _check_name(model, name)
    method = method_of(config)
    try:
        if method.inject is not None:
            method.inject(model, config, name)
        else:
            _inject_layers(model, config, name, method)
        for target in find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []:
            module = model.get_submodule(target)
            if not isinstance(module, ModulesToSave):
                if any(_is_wrapper(m) for m in module.modules()):
                    raise ConfigError(
                        f"modules_to_save names {target!r}, which holds another adapter's layers; "
                        "a module is either adapted or trained in full, not both"
                    )
                module = ModulesToSave(module)
                _replace(model, target, module)
            module.add_adapter(name)
    except BaseException:
        _remove_adapter_modules(model, name)
        raise
    setattr(model, STATE_ATTR, {**adapter_configs(model), name: config})
    if activate or not active_adapters(model):
        set_active(model, name)
    else:
        set_active(model, active_adapters(model))
    return model


def _inject_layers(model: nn.Module, config: AdapterConfig, name: str, method) -> None:
    def supports(module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):
            return module.peft_type == method.peft_type
        return method.layer_for(module) is not None

    inside = [n + "." for n, _ in wrappers(model)]
    targets = find_targets(model, config, supports, skip_prefixes=tuple(inside))
    for target in targets:
        module = model.get_submodule(target)
        if isinstance(module, ModulesToSave):
            raise ConfigError(f"{target!r} is in modules_to_save of another adapter and cannot also be a target")
        if not isinstance(module, AdapterLayer):
            module = method.layer_for(module)(module)
            _replace(model, target, module)
        module.add_adapter(name, config, target)
        device = next(module.base_layer.parameters()).device
        for _, param in module.adapter_parameters(name):
            param.data = param.data.to(device)


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their outputs add up) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for _, wrapper in wrappers(model):
        wrapper.active_adapters = [n for n in names if n in wrapper.adapter_names]
    setattr(model, ACTIVE_ATTR, names)
    _mark_trainable(model, names)


def _mark_trainable(model: nn.Module, names: list[str]) -> None:
    """Freeze everything but the named adapters; adapters loaded for inference (inference_mode) stay frozen."""
    model.requires_grad_(False)
    configs = adapter_configs(model)
    names = [n for n in names if not configs[n].inference_mode]
    for _, wrapper in wrappers(model):
        for name in names:
            if isinstance(wrapper, ModulesToSave):
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(True)
            else:
                for _, param in wrapper.adapter_parameters(name):
                    param.requires_grad_(True)
    for name in names:
        bias = getattr(configs.get(name), "bias", "none")
        if bias == "all":
            for pname, param in model.named_parameters():
                if pname.endswith("bias") and ".modules_to_save." not in pname and ".original_module." not in pname:
                    param.requires_grad_(True)
        elif bias.endswith("_only"):  # peft's "lora_only": biases of the adapted layers
            for _, wrapper in wrappers(model):
                if isinstance(wrapper, AdapterLayer) and name in wrapper.adapter_names:
                    base_bias = getattr(wrapper.base_layer, "bias", None)
                    if isinstance(base_bias, nn.Parameter):
                        base_bias.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left with no adapter are restored to their original modules."""
    _require(model, [name])
    merged = [path for path, w in wrappers(model) if isinstance(w, AdapterLayer) and name in w.merged_adapters]
    if merged:  # checked up front: failing half-way would leave some modules deleted and others not
        raise RuntimeError(f"adapter {name!r} is merged into {merged[0]}; call deltatune.unmerge(model) first")
    _remove_adapter_modules(model, name)
    configs = {k: v for k, v in adapter_configs(model).items() if k != name}
    setattr(model, STATE_ATTR, configs)
    remaining = [n for n in active_adapters(model) if n != name]
    if remaining or not configs:
        setattr(model, ACTIVE_ATTR, remaining)
        _mark_trainable(model, remaining)
    else:
        set_active(model, next(iter(configs)))


def _remove_adapter_modules(model: nn.Module, name: str) -> None:
    for path, wrapper in list(wrappers(model)):
        if name in wrapper.adapter_names:
            wrapper.delete_adapter(name)
        if not wrapper.adapter_names:
            base = wrapper.base_layer if isinstance(wrapper, AdapterLayer) else wrapper.original_module
            if isinstance(wrapper, AdapterLayer) and wrapper.merged_adapters:
                raise RuntimeError(f"{path} still has merged adapters; unmerge first")
            _replace(model, path, base)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; merged adapters are unmerged and merged back afterwards."""
    merged = {path: list(w.merged_adapters) for path, w in wrappers(model) if isinstance(w, AdapterLayer)}
    layers = [w for _, w in wrappers(model)]
    for w in layers:
        if isinstance(w, AdapterLayer):
            w.unmerge()
        w.adapters_disabled = True
    try:
        yield model
    finally:
        for path, w in wrappers(model):
            w.adapters_disabled = False
            if isinstance(w, AdapterLayer) and merged.get(path):
                w.merge(merged[path])


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Mixed batch: inside the block, row i of every forward uses adapter `adapter_names[i]` (None: the base).

    The result for each row equals running that row alone with only its adapter active.
    """
    _require(model, [n for n in adapter_names if n is not None])
    rows: dict[str | None, list[int]] = {}
    for i, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(i)
    groups = {name: torch.tensor(idx, dtype=torch.long) for name, idx in rows.items()}
    with routing(groups):
        yield model


def merge(model: nn.Module, names: Sequence[str] | None = None, *, safe: bool = False) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights. Idempotent.

    With `safe=True` every merged weight is computed and checked for NaN/Inf before any is written.
    """
    names = active_adapters(model) if names is None else list(names)
    _require(model, names)
    layers = [w for _, w in wrappers(model) if isinstance(w, AdapterLayer)]
    if safe:
        with torch.no_grad():
            for layer in layers:
                for name in names:
                    if name in layer.adapter_names and name not in layer.merged_adapters:
                        weight = layer.merge_weight(name, layer.get_base_weight().clone())
                        if not torch.isfinite(weight).all():
                            raise ValueError(
                                f"merging adapter {name!r} would write NaN/Inf into {type(layer.base_layer).__name__} "
                                "weights; nothing was changed"
                            )
    for layer in layers:
        layer.merge(names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge, restoring the base weights."""
    for _, wrapper in wrappers(model):
        if isinstance(wrapper, AdapterLayer):
            wrapper.unmerge()
    return model


def unload(model: nn.Module, *, merge_active: bool = False, safe: bool = False) -> nn.Module:
    """Remove every adapter and return the plain base model (merging the active adapters first if asked)."""
    if merge_active:
        merge(model, safe=safe)
    active = active_adapters(model)
    for path, wrapper in list(wrappers(model)):
        if isinstance(wrapper, AdapterLayer):
            if not merge_active:
                wrapper.unmerge()
            _replace(model, path, wrapper.base_layer)
        else:
            keep = next((n for n in active if n in wrapper.modules_to_save), None) if merge_active else None
            _replace(model, path, wrapper.modules_to_save[keep] if keep else wrapper.original_module)
    for attr in (STATE_ATTR, ACTIVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(True)
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge the active adapters and return the base model with no adapter modules: zero added latency."""
    return unload(model, merge_active=True, safe=safe)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total
