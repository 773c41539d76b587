"""Sites: the places of a model where adapters live. A site wraps one base module and holds a stack of deltas.

    x ──► t_K ∘ … ∘ t_1 (input transforms) ──► base ──► δ_1 ──► δ_2 ──► … ──► δ_K ──► y

`WeightSite` wraps a module with a weight (Linear, GPT-2 Conv1D, Embedding, or a quantized linear that
follows the `BaseWeight` protocol) and can merge its deltas into that weight. `BlockSite` wraps any module
(an attention block, an MLP): keyword arguments pass through, and a tuple output has its first element changed.
`ModulesToSave` holds full trainable copies of a module (peft's `modules_to_save`).

Deltas apply in the order they were attached (`Delta` documents the algebra); a mixed batch runs, per
adapter in the routing plan, only that adapter's delta on that adapter's rows.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .config import ConfigError
from .delta import Delta, NotMergeableError
from .routing import RoutingPlan, current_plan

try:  # GPT-2 style linear with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


class QuantizedMergeError(NotMergeableError):
    """An in-place merge into a quantized base, which could not be undone exactly."""


def is_quantized(module: nn.Module) -> bool:
    """A quantized linear layer (deltatune.quant.Linear4bit or any module with the same protocol)."""
    return bool(getattr(module, "quantized", False)) and callable(getattr(module, "dequantize_weight", None))


def weight_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding' or None: the weight layouts a WeightSite understands."""
    if is_quantized(module) or isinstance(module, nn.Linear):
        return "linear"
    if isinstance(Conv1D, type) and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


class BaseWeight:
    """The base weight of a weight site, as methods see it: in PyTorch's (out, in) layout, dequantized.

    For nn.Linear and quantized layers `shape` is (out_features, in_features); GPT-2's Conv1D stores its
    weight transposed and is presented the same way; an Embedding is (num_embeddings, embedding_dim).
    A quantized module provides `weight_shape`, `compute_dtype`, `dequantize_weight()` and `quantized = True`.
    """

    def __init__(self, module: nn.Module) -> None:
        kind = weight_kind(module)
        if kind is None:
            raise TypeError(f"{type(module).__name__} has no weight layout deltatune knows")
        self.module, self.kind = module, kind
        self.quantized = is_quantized(module)

    @property
    def shape(self) -> torch.Size:
        if self.quantized:
            return torch.Size(self.module.weight_shape)
        shape = self.module.weight.shape
        return shape[::-1] if self.kind == "conv1d" else shape

    @property
    def dtype(self) -> torch.dtype:
        return self.module.compute_dtype if self.quantized else self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return next(t.device for t in self.module.state_dict().values())

    def value(self) -> torch.Tensor:
        """The weight (out, in), detached; dequantized for a quantized base."""
        if self.quantized:
            return self.module.dequantize_weight()
        weight = self.module.weight.detach()
        return weight.T if self.kind == "conv1d" else weight

    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        return bias.detach() if isinstance(bias, torch.Tensor) else None

    def write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store (W, b) in place. A bias where the module had none becomes a new frozen parameter."""
        if self.quantized:
            raise QuantizedMergeError(
                f"{type(self.module).__name__} is quantized: merging into it in place is refused because it cannot be "
                "undone exactly; use deltatune.merge_and_unload(model), which writes a dequantized merged model"
            )
        with torch.no_grad():
            target = self.module.weight
            target.copy_(weight.T if self.kind == "conv1d" else weight)
            if bias is None:
                if getattr(self.module, "bias", None) is not None:
                    self.module.bias = None
            elif getattr(self.module, "bias", None) is None:
                self.module.bias = nn.Parameter(bias.to(target.dtype).clone(), requires_grad=False)
            else:
                self.module.bias.copy_(bias)

    def replacement(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A plain module computing (W, b): the base itself, written in place, or a new Linear for a quantized base."""
        if not self.quantized:
            self.write(weight, bias)
            return self.module
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.requires_grad_(False)


@dataclass
class Target:
    """What a delta's constructor is given: where it goes and what it can read there."""

    model: nn.Module
    name: str  # module name in the model, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module  # the base module (unwrapped)
    weight: BaseWeight | None  # None for block sites
    part: nn.Module | None = None  # the adapter's model-level part built before its deltas (Method.shared: VeRA's)

    def output_width(self) -> int:
        """Width of what the module returns (its first element for a tuple); see `block_widths`."""
        return block_widths(self.model, self.name, self.module, self.weight)[1]

    def input_width(self) -> int:
        """Width of the module's input (its first positional argument or `hidden_states`)."""
        width = block_widths(self.model, self.name, self.module, self.weight)[0]
        if width is None:
            raise ConfigError(f"{self.name} ({type(self.module).__name__}) takes token ids, not hidden states; a method "
                             "that reads the module's input needs a Linear or a block such as an attention or MLP")
        return width


_ADAPTER_INTERNALS = {"deltas", "modules_to_save", "original_module"}  # other adapters' modules inside a block


def block_widths(model: nn.Module, name: str, module: nn.Module, weight: BaseWeight | None = None) -> tuple[int | None, int]:
    """(input width, output width) of a site's base module, what a block method (a bottleneck or parallel
    adapter) sizes itself by. A Linear/Conv1D: (in, out); an Embedding: (None, dim). A block (an attention or
    MLP module): its first Linear's input width (q_proj, gate_proj) and its last Linear's output width (o_proj,
    down_proj), other adapters' layers inside it left out; a block holding no Linear: the model's hidden size."""
    weight = weight if weight is not None else (BaseWeight(module) if weight_kind(module) is not None else None)
    if weight is not None:
        if weight.kind == "embedding":
            return None, weight.shape[1]
        return weight.shape[1], weight.shape[0]
    linears = [m for path, m in module.named_modules()
               if _ADAPTER_INTERNALS.isdisjoint(path.split(".")) and weight_kind(m) in ("linear", "conv1d")]
    if linears:
        return BaseWeight(linears[0]).shape[1], BaseWeight(linears[-1]).shape[0]
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key), getattr(config, key)
    raise ConfigError(
        f"cannot tell the widths of {name} ({type(module).__name__}): it holds no Linear and the model config has "
        "no hidden_size; target modules whose input and output are the hidden state (an attention or MLP block, "
        "or a Linear)"
    )


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
