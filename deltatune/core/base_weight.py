"""What a delta is given at its site: the base module's weight as methods see it, and where the delta goes.

`BaseWeight` is the protocol through which deltas read and write a base weight: PyTorch's (out, in) layout
(GPT-2's Conv1D transposed for them), the compute dtype, dequantized for a quantized base (any module with
`quantized = True`, `weight_shape`, `compute_dtype`, `dequantize_weight()`), `write` refused for one.
`weight_kind` names the layouts known. `Target` is what a delta's constructor gets, with the module's
widths (`block_widths`) for block methods. The sites that hold deltas are `core/sites.py`, which re-exports
these names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError
from .delta import NotMergeableError

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
