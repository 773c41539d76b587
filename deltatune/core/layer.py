"""The generic adapter layer: a frozen base module plus any number of named adapters of one method.

    x ──► base_layer(x) ───────────────┐
    │                                  ▼
    └──► adapter_forward(name, x, ·) ──► y      for each active, unmerged adapter

A method subclasses `AdapterLayer` and fills in four things: `adapter_param_names` (the ModuleDict /
ParameterDict attributes keyed by adapter name), `add_adapter`, `adapter_forward` and, if it can merge,
`delta_weight` (or `merge_weight`/`unmerge_weight` for non-additive updates such as IA3 or DoRA). The layer
itself owns what is the same for every method: activation, disabling, merge/unmerge bookkeeping, safe
merging, deletion, and mixed batches in which each row is routed to its own adapter.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

# Mixed batches: adapter name -> row indices (None = base model), set by `deltatune.route`.
_ROUTING: contextvars.ContextVar[Mapping[str | None, torch.Tensor] | None] = contextvars.ContextVar(
    "deltatune_routing", default=None
)


def current_routing() -> Mapping[str | None, torch.Tensor] | None:
    return _ROUTING.get()


@contextlib.contextmanager
def routing(groups: Mapping[str | None, torch.Tensor]) -> Iterator[None]:
    token = _ROUTING.set(groups)
    try:
        yield
    finally:
        _ROUTING.reset(token)


def _routing_batch(groups: Mapping[str | None, torch.Tensor]) -> int:
    return sum(int(idx.numel()) for idx in groups.values())


def route_rows(groups, known, x: torch.Tensor, result: torch.Tensor, apply) -> torch.Tensor:
    """result with the rows of each known adapter replaced by apply(name, x[rows], result[rows]).

    Rows of adapters this layer does not hold, and rows routed to None, keep the base output. Without
    autograd (inference, serving) the rows are written into `result` in place: copying the whole output once
    per adapter made a 4-adapter forward 1.2x slower than peft's. With autograd, out of place.
    """
    if x.shape[0] != _routing_batch(groups):
        raise ValueError(
            f"mixed batch routes {_routing_batch(groups)} rows but the layer received a batch of {x.shape[0]}; "
            "give one adapter name per row of the batch (beam search and sampling several sequences per "
            "prompt multiply the rows)"
        )
    in_place = not (torch.is_grad_enabled() and (result.requires_grad or x.requires_grad)) and not _shares_memory(result, x)
    for name, rows in groups.items():
        if name not in known:
            continue
        rows = rows.to(x.device)
        rows_out = apply(name, x.index_select(0, rows), result.index_select(0, rows))
        result = result.index_copy_(0, rows, rows_out) if in_place else result.index_copy(0, rows, rows_out)
    return result


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether writing into a could change b (a base module that returns its input, e.g. nn.Identity)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class AdapterLayer(nn.Module):
    """Base for every weight-attached method. Subclasses set `adapter_param_names` and the hooks below."""

    adapter_param_names: ClassVar[tuple[str, ...]] = ()
    peft_type: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    # ---- hooks for methods ------------------------------------------------------------------------
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this layer class can wrap `module`."""
        raise NotImplementedError

    def add_adapter(self, name: str, config: Any, module_name: str) -> None:
        raise NotImplementedError

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output with adapter `name` applied, given the input and the base output."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base weight's own layout and dtype, for additive methods."""
        raise TypeError(f"{self.peft_type} adapters on {type(self.base_layer).__name__} cannot be merged")

    def merge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(name)

    def unmerge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(name)

    # ---- the base weight, dequantized if the base is quantized -------------------------------------
    def get_base_weight(self) -> torch.Tensor:
        dequantize = getattr(self.base_layer, "dequantize_weight", None)
        return dequantize() if callable(dequantize) else self.base_layer.weight.detach()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        requantize = getattr(self.base_layer, "set_weight", None)
        if callable(requantize):
            requantize(weight)
        else:
            self.base_layer.weight.data.copy_(weight)

    # ---- generic machinery -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_param_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(attribute-relative key, parameter) pairs of one adapter, e.g. ("lora_A.weight", p)."""
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                yield attr, item
            else:
                for key, param in item.named_parameters():
                    yield f"{attr}.{key}", param

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.adapters_disabled:
            return self.base_layer(x, *args, **kwargs)
        groups = current_routing()
        result = self.base_layer(x, *args, **kwargs)
        if groups is not None:
            if self.merged_adapters:
                raise RuntimeError("mixed batches need unmerged adapters; call deltatune.unmerge(model) first")
            return route_rows(groups, self.adapter_names, x, result, self.adapter_forward)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.adapter_forward(name, x, result)
        return result

    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the base weight. Already-merged adapters are skipped, so merging is idempotent."""
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            with torch.no_grad():
                merged = self.merge_weight(name, self.get_base_weight().clone())
                if safe and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} would write NaN/Inf into the base weight; nothing was changed")
                self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last first, restoring the base weight (up to floating-point rounding)."""
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                self.set_base_weight(self.unmerge_weight(name, self.get_base_weight().clone()))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for registry in self.per_adapter_state():
            if name in registry:
                del registry[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def per_adapter_state(self) -> list[Any]:
        """Other containers keyed by adapter name (scalings, ranks, dropouts) that deletion must also clear."""
        return []


class ModulesToSave(nn.Module):
    """A module trained in full as part of an adapter (peft's `modules_to_save`), e.g. a classifier head.

    Each adapter owns a trainable copy; the original stays frozen and serves when no adapter is active.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.adapters_disabled = False

    adapter_param_names: ClassVar[tuple[str, ...]] = ("modules_to_save",)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:  # nn.ModuleDict.pop takes no default
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        groups = current_routing()
        if groups is not None and not self.adapters_disabled:
            result = self.original_module(x, *args, **kwargs)
            return route_rows(
                groups, self.adapter_names, x, result, lambda name, xs, _: self.modules_to_save[name](xs, *args, **kwargs)
            )
        active = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.adapters_disabled or not active:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[active[0]](x, *args, **kwargs)
