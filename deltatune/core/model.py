"""Model-level operations: attach, activate, delete, disable, route. Generic over methods.

deltatune changes the user's model in place (a targeted `nn.Linear` becomes a `WeightSite` wrapping it), so
the model keeps its class, its `generate`, and its state-dict keys for every base weight. The attached
adapters live on the root module in `model.deltatune_adapters` (name -> `Adapter`).

Decisions that hold for every method:
- deltas on one site apply in attach order, and merging gives exactly the forward of the stack;
- every operation over many modules (attach, merge, load) checks all of them before changing the first;
- merged weights are explicit state: changing the active set unmerges first (as peft does), and the base
  alone (`disable_adapters`) is refused while anything is merged, rather than unmerged and merged back.

Merging and unloading are `core/merging.py`, where the attached adapters live on the model is `core/state.py`;
their names are importable from here too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapter import PARTS_ATTR, Adapter, add_part, logical_name, replace_module, resolve
from .config import AdapterConfig, ConfigError
from .merging import declare_added_biases, merge, merge_and_unload, unload, unmerge  # noqa: F401  (re-exported)
from .registry import method_of
from .routing import RoutingPlan, using
from .sites import HOSTS, BaseWeight, BlockSite, ModulesToSave, Site, Target, WeightSite, hosts, weight_kind
from .state import ACTIVE_ATTR, STATE_ATTR, active_adapters, adapter_configs, adapters  # noqa: F401  (re-exported)
from .state import require_attached as _require
from .targets import find_modules_to_save, find_targets


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or not name.isidentifier():
        raise ValueError(f"adapter name {name!r} must be a non-empty Python identifier without dots, e.g. 'default'")
    if name in adapters(model):
        raise ValueError(f"an adapter named {name!r} is already attached; delete it first or pick another name")


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True) -> nn.Module:
    """Add adapter `name` described by `config` to `model` (in place) and return the model.

    Every base parameter is frozen; the active adapters' parameters are trainable. If anything fails, the
    model is left exactly as it was.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig such as deltatune.LoraConfig, got {type(config).__name__}")
    _check_name(model, name)
    missing = [n for n in getattr(config, "depends_on", ()) if n not in adapters(model)]
    if missing:  # an adapter that depends on other adapters (AdapterFusion): they come first
        raise ConfigError(f"{config.peft_type} adapter {name!r} is an adapter that depends on other adapters "
                          f"({', '.join(map(repr, config.depends_on))}); {missing[0]!r} is not attached: attach or load "
                          "it first")
    method = method_of(config)
    if method.resolve is not None:  # model-dependent fields (prompt tuning's token_dim), checked against the model
        config = method.resolve(model, config)
    adapter = Adapter(name, config, method)
    try:
        if method.delta_classes(config):
            _place_deltas(model, adapter)
        for target in find_modules_to_save(model, config.modules_to_save) if config.modules_to_save else []:
            _save_module(model, adapter, target)
        if method.select is not None:
            _select(model, adapter, method.select(model, config, [resolve(model, p) for p in adapter.sites]))
        if method.inject is not None:
            add_part(model, name, method.inject(model, config, name).train(model.training))
    except BaseException:
        adapter.remove(model)
        raise
    setattr(model, STATE_ATTR, {**adapters(model), name: adapter})
    set_active(model, [*active_adapters(model)] if not activate and active_adapters(model) else name)
    return model


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(logical name, module) of every module an adapter could target; a site stands for its base module.

    The insides of a site (its deltas, a weight site's base), of a modules_to_save wrapper and of the adapters'
    model-level parts (a prefix's projection MLP) are never targets; a block site's children are, under their
    logical names.
    """
    skip: list[str] = [PARTS_ATTR]
    out = []
    for path, module in model.named_modules():
        if not path or any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, Site):
            skip += [f"{path}.deltas", f"{path}.base_layer"] if isinstance(module, WeightSite) else [f"{path}.deltas"]
        elif isinstance(module, ModulesToSave):
            skip += [f"{path}.original_module", f"{path}.modules_to_save"]
        parent = path.rpartition(".")[0]
        if path.endswith(".base_layer") and isinstance(model.get_submodule(parent), BlockSite):
            continue
        out.append((logical_name(path), module))
    return out


def _place_deltas(model: nn.Module, adapter: Adapter) -> list[str]:
    config, method = adapter.config, adapter.method

    def supports(module: nn.Module) -> bool:
        if isinstance(module, ModulesToSave):
            return False
        base = module.base_layer if isinstance(module, Site) else module
        cls = method.delta_for(base, config)
        return cls is not None and not (isinstance(module, BlockSite) and cls.site == "weight")

    targets = find_targets(model, config, supports, _candidates(model))
    part = None
    if method.shared is not None:  # built before any delta, seeing every target (VeRA: sized to the largest)
        part = method.shared(model, config, adapter.name, [_target_view(model, t) for t in targets])
        add_part(model, adapter.name, part.train(model.training))
    for target in targets:
        path = resolve(model, target)  # an enclosing target wrapped just before moved it under `.base_layer`
        module = model.get_submodule(path)
        site = module if isinstance(module, Site) else None
        base = site.base_layer if site is not None else module
        cls = method.delta_for(base, config)
        new_site = site is None
        if new_site:
            site = WeightSite(base) if weight_kind(base) is not None else BlockSite(base)
            site.train(base.training)  # a new wrapper takes its module's mode (an nn.Module starts in training)
        delta = cls(Target(model, target, base, getattr(site, "base_weight", None), part), config)
        if new_site:  # only once the delta is built: a delta that refuses its module leaves no empty site behind
            replace_module(model, path, site)
        delta.to(_device_of(base))
        delta.train(model.training)  # an adapter attached to a model in eval mode must not run its dropout
        site.add(adapter.name, delta)
        adapter.sites.append(target)
    return targets


def _target_view(model: nn.Module, target: str) -> Target:
    """What a delta at `target` will be given, before any site is placed there (for `Method.shared`)."""
    module = model.get_submodule(resolve(model, target))
    base = module.base_layer if isinstance(module, Site) else module
    weight = module.base_weight if isinstance(module, WeightSite) else (BaseWeight(base) if weight_kind(base) else None)
    return Target(model, target, base, weight)


def _device_of(module: nn.Module) -> torch.device:
    return next((t.device for t in module.state_dict().values()), torch.device("cpu"))


def _select(model: nn.Module, adapter: Adapter, names: list[str]) -> None:
    params = dict(model.named_parameters())
    taken = {id(p): a.name for a in adapters(model).values() for p, _ in a.selected.values()}
    clash = [n for n in names if id(params[n]) in taken]
    if clash:
        raise ConfigError(
            f"adapter {adapter.name!r} would train {clash[0]} in place, which adapter {taken[id(params[clash[0]])]!r} "
            "already trains; a base parameter belongs to one adapter at a time"
        )
    adapter.selected = {n: (params[n], params[n].detach().clone()) for n in names}


def _save_module(model: nn.Module, adapter: Adapter, target: str) -> None:
    module = model.get_submodule(target)
    if not isinstance(module, ModulesToSave):
        if any(isinstance(m, HOSTS) for m in module.modules()):
            raise ConfigError(
                f"modules_to_save names {target!r}, which holds another adapter's layers; "
                "a module is either adapted or trained in full, not both"
            )
        module = ModulesToSave(module)
        module.modules_to_save.train(module.original_module.training)
        module.training = module.original_module.training
        replace_module(model, target, module)
    module.add(adapter.name)
    adapter.saved.append(logical_name(target))


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (stacked in attach order) and the only trainable ones.

    Adapters merged into the base weights are unmerged first, as peft does, so the weights never keep the
    delta of an adapter that is no longer active.
    """
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    if any(host.merged_adapters for _, host in hosts(model)) and names != active_adapters(model):
        unmerge(model)
    for adapter in adapters(model).values():
        if adapter.name not in names:
            adapter.swap_out(model)
    for adapter in adapters(model).values():
        if adapter.name in names:
            adapter.swap_in(model)
    for _, host in hosts(model):
        host.active_adapters = [n for n in names if n in host.adapter_names]
    setattr(model, ACTIVE_ATTR, names)
    _mark_trainable(model, names)


def _mark_trainable(model: nn.Module, names: list[str]) -> None:
    """Freeze everything but the named adapters; adapters loaded for inference (inference_mode) stay frozen."""
    model.requires_grad_(False)
    for name in names:
        adapter = adapters(model)[name]
        if not adapter.config.inference_mode:
            for param in adapter.parameters(model):
                param.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left with no adapter are restored to their original modules."""
    _require(model, [name])
    users = [n for n, a in adapters(model).items() if n != name and name in getattr(a.config, "depends_on", ())]
    if users:
        raise RuntimeError(f"adapter {name!r} is used by {users[0]!r}, an adapter that depends on other adapters; "
                           f"delete {users[0]!r} first")
    merged = [path for path, host in hosts(model) if name in host.merged_adapters]
    if merged:  # checked up front: failing half-way would leave some modules deleted and others not
        raise RuntimeError(f"adapter {name!r} is merged into {merged[0]}; call deltatune.unmerge(model) first")
    adapters(model)[name].remove(model)
    remaining_adapters = {k: v for k, v in adapters(model).items() if k != name}
    setattr(model, STATE_ATTR, remaining_adapters)
    remaining = [n for n in active_adapters(model) if n != name]
    if remaining or not remaining_adapters:
        setattr(model, ACTIVE_ATTR, remaining)
        _mark_trainable(model, remaining)
    else:
        set_active(model, next(iter(remaining_adapters)))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block. Refused while adapters are merged (unmerge first)."""
    merged = [path for path, host in hosts(model) if host.merged_adapters]
    if merged:
        raise RuntimeError(
            f"adapters are merged into the base weights (first: {merged[0]}); call deltatune.unmerge(model) before "
            "disable_adapters, so the base weights are not rewritten twice"
        )
    active = [adapters(model)[n] for n in active_adapters(model)]
    for adapter in active:
        adapter.swap_out(model)
    for _, host in hosts(model):
        host.adapters_disabled = True
    parts = [a.part(model) for a in adapters(model).values()]
    for part in parts:
        if part is not None:
            part.disabled = True
    try:
        yield model
    finally:
        for _, host in hosts(model):
            host.adapters_disabled = False
        for part in parts:
            if part is not None:
                part.disabled = False
        for adapter in active:
            adapter.swap_in(model)


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: Sequence[str | None], *, per_token: bool = False) -> Iterator[nn.Module]:
    """Mixed batch: inside the block, row i of every forward uses adapter `adapter_names[i]` (None: the base).

    With `per_token=True` the names are per token of a flattened batch (continuous batching). The result for
    each row equals running that row alone with only its adapter active.
    """
    adapter_names = _route_names(adapter_names, per_token)
    named = [n for n in dict.fromkeys(adapter_names) if n is not None]
    _require(model, named)
    in_place = [n for n in named if adapters(model)[n].in_place()]
    if in_place:
        raise ValueError(
            f"adapter {in_place[0]!r} trains base parameters in place ({adapters(model)[in_place[0]].config.peft_type}), "
            "which cannot differ per row; merge it into its own model copy, or serve it alone"
        )
    with using(RoutingPlan(adapter_names, per_token=per_token)):
        yield model


def _route_names(names: object, per_token: bool) -> list[str | None]:
    """The names of `route`, checked: one per row (or, per token, one per token: a (rows x tokens) nested
    list is flattened row by row, as the batch's tokens are)."""
    if isinstance(names, str):
        raise TypeError(f"route takes a list of adapter names (one per row), got the string {names!r}; "
                        f"for every row of a batch use [{names!r}] * batch_size")
    names = list(names)
    nested = [i for i, n in enumerate(names) if isinstance(n, (list, tuple))]
    if nested:
        if not per_token:
            raise TypeError(f"route: row {nested[0]} is given a list of names, but per-row routing takes one name "
                            "per row; pass per_token=True for names per token")
        names = [n for row in names for n in (row if isinstance(row, (list, tuple)) else [row])]
    bad = [(i, n) for i, n in enumerate(names) if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"route: position {bad[0][0]} is {bad[0][1]!r}; each entry is an adapter name (str) or None "
                        "(the base)")
    return names


def trainable_parameters_line(model: nn.Module) -> str:
    """"trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5040", as peft prints it."""
    trainable, total = trainable_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the trainable parameter count and share of the model (peft's `print_trainable_parameters`)."""
    print(trainable_parameters_line(model))


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> optimizer role declared by its delta (`Delta.lr_roles`), e.g. LoRA's "lora_B"."""
    roles: dict[int, str] = {}
    for _, host in hosts(model):
        if isinstance(host, Site):
            for delta in host.deltas.values():
                for key, tensor in delta.tensors().items():
                    role = next((r for prefix, r in delta.lr_roles.items() if key.startswith(prefix)), None)
                    if role is not None:
                        roles[id(tensor)] = role
    return roles


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total
