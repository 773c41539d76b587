"""Whole-model quantization: replace a model's linear layers by `Linear4bit`, and account for the memory.

QLoRA's recipe (§4, artidoro/qlora): every linear layer is stored in NF4 except the output head; norms and
embeddings stay in higher precision. `quantize_model` does that in place, one layer at a time, so the only
extra memory is one layer's temporaries. `load_quantized` goes further for a local safetensors checkpoint:
the model is built on the meta device and each linear weight is read, quantized and dropped in turn, so the
full-precision linear weights are never all in memory at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from .linear4bit import Linear4bit, QuantizedLinear
from .nf4 import BLOCKSIZE, nf4_bytes

DEFAULT_SKIP = ("lm_head", "score", "classifier")  # output heads (causal LM, sequence classification)


class QuantizationError(ValueError):
    """A model or layer that cannot be quantized as asked; the message names the module."""


def _name_matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_output_head(model: nn.Module, module: nn.Linear) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is module


def _tied_to_embedding(model: nn.Module, module: nn.Linear) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    return weight is not None and module.weight is weight or (
        weight is not None and not module.weight.is_meta and module.weight.data_ptr() == weight.data_ptr())


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the linear layers `quantize_model` replaces: every nn.Linear except those named in `skip`
    (exact name or dotted suffix), the model's output embeddings and any whose weight is the input
    embedding's (a tied output head).
    Subclasses of nn.Linear (e.g. MultiheadAttention's out_proj, read through `.weight`) are left alone."""
    skip = tuple(skip)
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not _name_matches(name, skip) and not _is_output_head(model, module) \
                and not _tied_to_embedding(model, module):
            names.append(name)
    return names


def require_quantizable(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """`quantizable_linears(model, skip)`, or a QuantizationError naming the model's layer types if it is empty."""
    names = quantizable_linears(model, skip)
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight")})
        raise QuantizationError(
            f"{type(model).__name__} has no nn.Linear layer to quantize (skip={tuple(skip)}); modules with weights: "
            f"{', '.join(kinds) or 'none'}. Only nn.Linear is supported (GPT-2's Conv1D is not yet): load it "
            "without quantization.")
    return names


def _check_no_adapters(model: nn.Module) -> None:
    wrapped = [name for name, m in model.named_modules() if hasattr(m, "base_layer")]
    if wrapped:
        raise QuantizationError(
            f"the model already has adapters (e.g. at {wrapped[0]!r}): quantize the base model first, then attach")


def quantize_model(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                   skip: Iterable[str] = DEFAULT_SKIP, blocksize: int = BLOCKSIZE) -> list[str]:
    """Replace, in place, every quantizable nn.Linear of `model` (see `quantizable_linears`) by a `Linear4bit`.

    One layer at a time: each full-precision weight is freed as soon as its NF4 copy exists (unless something
    else still holds it). Norms, embeddings, the output head and any non-Linear module are untouched.
    Returns the names of the replaced layers. Call it before attaching adapters.
    """
    _check_no_adapters(model)
    names = require_quantizable(model, skip)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, Linear4bit.from_linear(
            linear, compute_dtype=compute_dtype, double_quant=double_quant, blocksize=blocksize))
        del linear
    _mark(model, compute_dtype, double_quant, blocksize, names)
    return names


def _mark(model: nn.Module, compute_dtype: torch.dtype, double_quant: bool, blocksize: int, names: list[str]):
    # What the adapter file's metadata and `deltatune info` report; not a transformers quantization_config,
    # so save_pretrained does not pretend the checkpoint can be reloaded by transformers.
    # "name" is what the core's save_adapter writes into the adapter file's metadata.
    model.deltatune_quantization = {"name": "nf4-dq" if double_quant else "nf4", "quant_type": "nf4",
                                    "blocksize": blocksize, "double_quant": double_quant,
                                    "compute_dtype": str(compute_dtype).removeprefix("torch."),
                                    "modules": len(names)}


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLinear]]:
    """(name, layer) of every frozen quantized linear layer: NF4 `Linear4bit`, GGUF `LinearQ4_1`."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            yield name, module


def is_quantized_model(model: nn.Module) -> bool:
    return next(quantized_layers(model), None) is not None


def check_full_precision(model: nn.Module, what: str = "saving the model") -> None:
    """Raise if `model` holds 4-bit layers: for callers about to write a full-precision checkpoint (whose
    state dict would hold NF4 codes under names transformers does not know, and reload as random weights)."""
    names = [name for name, _ in quantized_layers(model)]
    if names:
        raise QuantizationError(
            f"{what}: the model has {len(names)} 4-bit layers (e.g. {names[0]!r}), which a full-precision checkpoint "
            "cannot hold. Dequantize first (deltatune.quant.dequantize_model(model, dtype=torch.bfloat16)), or save "
            "only the adapter.")


def check_quantized_training(model: nn.Module) -> None:
    """Refuse an adapter that trains whole base weight matrices in place (full fine-tuning) on a model with NF4
    layers: their weights are frozen codes, not parameters, so it would silently train everything but them.
    Adapters on top of the base (LoRA, DoRA, IA3, ...) and in-place biases (BitFit) are fine."""
    from ..core.model import adapters

    if not is_quantized_model(model):
        return
    for adapter in adapters(model).values():
        matrices = [name for name, (param, _) in adapter.selected.items() if param.ndim >= 2]
        if matrices:
            raise QuantizationError(
                f"adapter {adapter.name!r} ({adapter.config.peft_type}) trains base weight matrices in place (e.g. "
                f"{matrices[0]}), but the model's {sum(1 for _ in quantized_layers(model))} NF4 layers hold frozen "
                "4-bit codes that cannot be trained; train it on the full-precision base (quantize: null), or "
                "train an adapter on top of the 4-bit base (LoRA, DoRA, IA3)")


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `Linear4bit` by an nn.Linear holding its dequantized weight (in `dtype`, default each
    layer's compute dtype), in place; the inverse of `quantize_model` up to the quantization error. Adapters
    wrapping a 4-bit layer keep wrapping: the new Linear takes its place. Returns `model`."""
    for name, layer in list(quantized_layers(model)):
        weight = layer.dequantize_weight().to(dtype or layer.compute_dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear.requires_grad_(False))
    if hasattr(model, "deltatune_quantization"):
        del model.deltatune_quantization
    return model


@dataclass(frozen=True)
class Footprint:
    """Bytes of the quantizable linear weights in each storage format, and of everything else.

    params: weights in those layers. fp32/bf16/nf4/nf4_dq: their bytes as fp32, bf16, NF4 with fp32 absmax,
    NF4 with double quantization (codes + constants, per layer, ragged blocks included). stored: bytes those
    layers hold now (NF4 buffers for `Linear4bit`, the float weight otherwise). other: bytes of all other
    parameters and buffers (embeddings, norms, head, biases), at their current dtype.
    """

    layers: int
    params: int
    fp32: int
    bf16: int
    nf4: int
    nf4_dq: int
    stored: int
    other: int

    def bits_per_weight(self, kind: str = "nf4_dq") -> float:
        return 8 * getattr(self, kind) / self.params

    def summary(self) -> str:
        """One line: the quantized layers' memory now, against bf16."""
        return (f"{self.layers} linear layers, {self.stored / 2**20:.1f} MiB ({8 * self.stored / self.params:.3f} "
                f"bits/weight; {self.bf16 / 2**20:.1f} MiB in bf16), rest of the model {self.other / 2**20:.1f} MiB")

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:8.1f} MiB"  # noqa: E731
        rows = [("fp32", self.fp32), ("bf16", self.bf16), ("NF4", self.nf4), ("NF4 + DQ", self.nf4_dq)]
        lines = [f"{self.layers} linear layers, {self.params:,} weights"]
        lines += [f"  {name:9s}{mb(b)}  {8 * b / self.params:6.3f} bits/weight" for name, b in rows]
        lines.append(f"  stored now {mb(self.stored)};  rest of the model {mb(self.other)}")
        return "\n".join(lines)


def footprint(model: nn.Module, *, skip: Iterable[str] = DEFAULT_SKIP, blocksize: int = BLOCKSIZE) -> Footprint:
    """The memory of the layers QLoRA quantizes: the model's `Linear4bit` layers if it has any, else the
    layers `quantize_model(model, skip=skip)` would replace."""
    quantized = dict(quantized_layers(model))
    if quantized:
        layers = {name: (m.weight_shape.numel(), m.blocksize) for name, m in quantized.items()}
    else:
        layers = {name: (model.get_submodule(name).weight.numel(), blocksize)
                  for name in quantizable_linears(model, skip)}
    counted: set[int] = set()
    stored = 0
    for name in layers:
        module = model.get_submodule(name)
        tensors = module.state_tensors() if name in quantized else [module.weight]
        for t in tensors:
            if t is not None:
                stored += t.numel() * t.element_size()
                counted.add(id(t))
    other = sum(t.numel() * t.element_size() for t in _unique_tensors(model) if id(t) not in counted)
    params = sum(n for n, _ in layers.values())
    return Footprint(
        layers=len(layers), params=params, fp32=4 * params, bf16=2 * params,
        nf4=sum(nf4_bytes(n, blocksize=b, double_quant=False) for n, b in layers.values()),
        nf4_dq=sum(nf4_bytes(n, blocksize=b, double_quant=True) for n, b in layers.values()),
        stored=stored, other=other)


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())
