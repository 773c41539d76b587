"""Sites: the places of a model where adapters live. A site wraps one base module and holds a stack of deltas.

    x ──► t_K ∘ … ∘ t_1 (input transforms) ──► base ──► δ_1 ──► δ_2 ──► … ──► δ_K ──► y

`WeightSite` wraps a module with a weight (Linear, GPT-2 Conv1D, Embedding, or a quantized linear that
follows the `BaseWeight` protocol) and can merge its deltas into that weight. `BlockSite` wraps any module
(an attention block, an MLP): keyword arguments pass through, and a tuple output has its first element changed.
`ModulesToSave` holds full trainable copies of a module (peft's `modules_to_save`). What a delta is given
(`BaseWeight`, `Target`, `weight_kind`, `block_widths`) is `core/base_weight.py`, importable from here too.

Deltas apply in the order they were attached (`Delta` documents the algebra); a mixed batch runs, per
adapter in the routing plan, only that adapter's delta on that adapter's rows.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .base_weight import (  # noqa: F401  (re-exported: what a delta is given lives in base_weight.py)
    BaseWeight,
    Conv1D,
    QuantizedMergeError,
    Target,
    block_widths,
    is_quantized,
    weight_kind,
)
from .delta import Delta, NotMergeableError
from .routing import RoutingPlan, current_plan


class Stage:
    """A delta's place in the stack being run; gives it the affine map (W, b) of the stack before it."""

    __slots__ = ("site", "before")

    def __init__(self, site: "Site", before: list[Delta]) -> None:
        self.site, self.before = site, before

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return self.site.affine(self.before)


def _refuse_training_merged(site: "Site") -> None:
    """A training forward through a site whose only active adapters are merged, with their parameters still
    trainable: the loss would not reach them ("element 0 of tensors does not require grad"); say why instead."""
    trainable = [n for n in site.merged_adapters if any(p.requires_grad for p in site.deltas[n].parameters())]
    if trainable:
        raise RuntimeError(f"adapter {trainable[0]!r} is merged into the base weights, and a merged adapter does not "
                           "train (its parameters are no longer in the forward); call deltatune.unmerge(model) "
                           "before training, or run the merged model under model.eval() or torch.no_grad()")


class Site(nn.Module):
    """A base module plus named deltas, applied in the order they were attached."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.deltas.keys())

    def add(self, name: str, delta: Delta) -> None:
        self.deltas[name] = delta

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        if name in self.deltas:
            del self.deltas[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def chain(self) -> list[Delta]:
        """The deltas a plain forward runs: active and not merged, in attach order."""
        return [d for n, d in self.deltas.items() if n in self.active_adapters and n not in self.merged_adapters]

    # ---- how the wrapped module takes its input and gives its output --------------------------------
    def _input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        """(the input deltas see, a function calling the base with that input replaced)."""
        return args[0], lambda x: self.base_layer(x, *args[1:], **kwargs)

    def _output(self, out: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        return out, lambda y: y

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.adapters_disabled:
            return self.base_layer(*args, **kwargs)
        plan = current_plan()
        if plan is not None:
            return self._routed(plan, args, kwargs)
        chain = self.chain()
        if not chain:
            if self.merged_adapters and self.training and torch.is_grad_enabled():
                _refuse_training_merged(self)
            return self.base_layer(*args, **kwargs)
        x, call_base = self._input(args, kwargs)
        inputs = _stage_inputs(chain, x)
        y, rebuild = self._output(call_base(inputs[0]))
        for i, delta in enumerate(chain):
            y = delta(inputs[i + 1], y, Stage(self, chain[:i]))
        return rebuild(y)

    def _routed(self, plan: RoutingPlan, args: tuple, kwargs: dict) -> Any:
        x, call_base = self._input(args, kwargs)
        groups = [(n, rows) for n, rows in plan.groups(x.device) if n in self.deltas]
        if not groups:
            return self.base_layer(*args, **kwargs)
        if self.merged_adapters:
            raise RuntimeError("mixed batches need unmerged adapters; call deltatune.unmerge(model) first")
        xf = plan.flat(x)
        inputs = {n: _stage_inputs([self.deltas[n]], xf.index_select(0, rows)) for n, rows in groups}
        if any(self.deltas[n].transforms_input for n, _ in groups):
            x_in = xf.clone()
            for name, rows in groups:
                x_in = x_in.index_copy(0, rows, inputs[name][0])
            x = x_in.reshape(x.shape)
        y, rebuild = self._output(call_base(x))
        yf = plan.flat(y)
        # Without autograd (inference, serving) rows are written in place: copying the whole output once per
        # adapter made a 4-adapter forward 1.2x slower than peft's. With autograd, out of place.
        in_place = not (torch.is_grad_enabled() and (yf.requires_grad or xf.requires_grad)) and not _shares_memory(yf, xf)
        for name, rows in groups:
            delta = self.deltas[name]
            rows_out = delta(inputs[name][1], yf.index_select(0, rows), Stage(self, []))
            yf = yf.index_copy_(0, rows, rows_out) if in_place else yf.index_copy(0, rows, rows_out)
        return rebuild(yf.reshape(y.shape))

    # ---- merging (weight sites only) ------------------------------------------------------------------
    def affine(self, deltas: list[Delta]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotMergeableError(f"{type(self.base_layer).__name__} is wrapped as a block and has no weight to merge into")

    def check_merge(self, names: list[str], *, in_place: bool = True) -> list[str]:
        """Which of `names` a merge would fold here, checked (mergeable, order-preserving); changes nothing."""
        if not any(n in self.deltas for n in names):
            return []
        raise NotMergeableError(f"adapters on block {type(self.base_layer).__name__} cannot be merged")


class WeightSite(Site):
    """A Linear / Conv1D / Embedding (or quantized linear) with deltas that may merge into its weight."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.base_weight = BaseWeight(base_layer)
        self._had_bias = getattr(base_layer, "bias", None) is not None

    def affine(self, deltas: list[Delta]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of the base followed by `deltas` merged in order, in the weight's dtype; nothing is written."""
        weight, bias = self.base_weight.value(), self.base_weight.bias()
        for delta in deltas:
            weight, bias = delta.merge(weight, bias)
        return weight, bias

    def check_merge(self, names: list[str], *, in_place: bool = True) -> list[str]:
        new = [n for n in self.deltas if n in names and n not in self.merged_adapters]
        for name in new:
            delta = self.deltas[name]
            if not delta.mergeable:
                raise NotMergeableError(f"adapter {name!r} ({type(delta).__name__}) cannot be merged into the base weights")
            # A merged delta moves to the bottom of the stack; that changes the function unless every unmerged
            # active delta attached before it commutes with it (two additive updates do).
            earlier = list(self.deltas)[: list(self.deltas).index(name)]
            for other in earlier:
                if other in self.active_adapters and other not in self.merged_adapters and other not in new:
                    if not (getattr(delta, "additive", False) and getattr(self.deltas[other], "additive", False)):
                        raise NotMergeableError(
                            f"merging {name!r} alone would move it below {other!r}, which was attached before it and "
                            f"does not commute with it; merge both, or neither"
                        )
        if new and in_place and self.base_weight.quantized:
            raise QuantizedMergeError(
                f"{type(self.base_layer).__name__} is quantized: merging into it in place is refused because it cannot "
                "be undone exactly; use deltatune.merge_and_unload(model), which writes a dequantized merged model"
            )
        return new

    def merged_value(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) after merging `names` on top of what is merged now; nothing is written."""
        return self.affine([self.deltas[name] for name in names])

    def merge(self, names: list[str]) -> None:
        new = self.check_merge(names)
        if new:
            with torch.no_grad():
                self.base_weight.write(*self.merged_value(new))
            self.merged_adapters.extend(new)

    def unmerge(self) -> None:
        """Undo every merge, last first (exact up to floating-point rounding)."""
        if not self.merged_adapters:
            return
        with torch.no_grad():
            weight, bias = self.base_weight.value(), self.base_weight.bias()
            for name in reversed(self.merged_adapters):
                weight, bias = self.deltas[name].unmerge(weight, bias)
            if not self._had_bias:
                bias = None
            self.base_weight.write(weight, bias)
        self.merged_adapters.clear()

    def unwrapped(self, merge_names: list[str]) -> nn.Module:
        """The plain module computing the base with `merge_names` merged (a dequantized Linear for a 4-bit base)."""
        if not self.base_weight.quantized:
            self.merge(merge_names)
            return self.base_layer
        with torch.no_grad():
            weight, bias = self.merged_value([n for n in self.deltas if n in merge_names])
        return self.base_weight.replacement(weight, bias)


class BlockSite(Site):
    """Any module (an attention block, an MLP): the first positional argument or `hidden_states` is the input,
    and the output, or its first element when the module returns a tuple, is what deltas change."""

    def _input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        if args:
            return args[0], lambda x: self.base_layer(x, *args[1:], **kwargs)
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"], lambda x: self.base_layer(**{**kwargs, "hidden_states": x})
        raise TypeError(f"{type(self.base_layer).__name__} was called without a positional input or hidden_states=")

    def _output(self, out: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        if isinstance(out, tuple):
            return out[0], lambda y: (y, *out[1:])
        return out, lambda y: y


def _stage_inputs(chain: list[Delta], x: torch.Tensor) -> list[torch.Tensor]:
    """inputs[i] is what the stack below delta i sees; inputs[0] goes to the base, inputs[-1] is x itself."""
    inputs = [x]
    for delta in reversed(chain):
        inputs.append(delta.transform_input(inputs[-1]) if delta.transforms_input else inputs[-1])
    return inputs[::-1]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether writing into a could change b (a base module that returns its input, e.g. nn.Identity)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ModulesToSave(nn.Module):
    """A module trained in full as part of an adapter (peft's `modules_to_save`), e.g. a classifier head.

    Each adapter owns a trainable copy; the original stays frozen and serves when no adapter is active.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def base_layer(self) -> nn.Module:
        return self.original_module

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:  # nn.ModuleDict.pop takes no default
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = current_plan()
        if plan is not None and not self.adapters_disabled:
            groups = [(n, rows) for n, rows in plan.groups(x.device) if n in self.modules_to_save]
            result = self.original_module(x, *args, **kwargs)
            xf, yf = plan.flat(x), plan.flat(result)
            for name, rows in groups:
                yf = yf.index_copy(0, rows, self.modules_to_save[name](xf.index_select(0, rows), *args, **kwargs))
            return yf.reshape(result.shape)
        active = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.adapters_disabled or not active:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[active[0]](x, *args, **kwargs)


HOSTS = (Site, ModulesToSave)


def hosts(model: nn.Module) -> Iterator[tuple[str, Site | ModulesToSave]]:
    """(module name, host) for every site and modules_to_save wrapper of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, HOSTS):
            yield name, module
