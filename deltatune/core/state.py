"""Where a model keeps its attached adapters: two attributes on the root module, and their readers.

    model.deltatune_adapters   name -> Adapter, in attach order (`adapters`, `adapter_configs`)
    model.deltatune_active     the active names, stacked in attach order (`active_adapters`)

`core/model.py` (attach, activate, delete) writes them; `core/merging.py` (merge, unload) and every other
module read them through these functions, never through the attribute names.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .adapter import Adapter
from .config import AdapterConfig

STATE_ATTR = "deltatune_adapters"
ACTIVE_ATTR = "deltatune_active"


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """name -> attached Adapter (empty if none)."""
    return getattr(model, STATE_ATTR, {})


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """name -> config of every adapter attached to `model` (empty if none)."""
    return {name: adapter.config for name, adapter in adapters(model).items()}


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, ACTIVE_ATTR, []))


def require_attached(model: nn.Module, names: Sequence[str]) -> None:
    """KeyError naming the first unknown adapter and the attached ones, if any of `names` is not attached."""
    known = adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {', '.join(map(repr, unknown))}; attached adapters: {sorted(known) or 'none'}")
