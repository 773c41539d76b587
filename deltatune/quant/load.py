"""Load a transformers checkpoint straight into NF4, one tensor at a time.

`quantize_model` needs the full-precision model first; `load_quantized` never holds it: the model is built on
the meta device, the quantizable linear layers become empty `Linear4bit`s, and each tensor of the safetensors
files is read, quantized (or kept, for embeddings, norms and the head) and dropped before the next one. Peak
memory is the quantized model plus one weight.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from .linear4bit import Linear4bit
from .model import DEFAULT_SKIP, QuantizationError, _mark, require_quantizable
from .nf4 import BLOCKSIZE, quantize_nf4


def load_quantized(path: str | Path, *, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                   skip: Iterable[str] = DEFAULT_SKIP, dtype: torch.dtype = torch.float32,
                   blocksize: int = BLOCKSIZE, model_class=None) -> nn.Module:
    """A causal LM (or `model_class`, a transformers Auto class) from the local directory `path` (config.json
    and *.safetensors), with the same layers in NF4 as `quantize_model(load(path), ...)` would give, bit for bit.

    dtype: of everything not quantized (embeddings, norms, the head, biases). Returns the model in eval mode.
    """
    from transformers import AutoConfig

    path = Path(path)
    require_safetensors(path)
    config = AutoConfig.from_pretrained(path)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        return Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, double_quant=double_quant, blocksize=blocksize,
                          bias_dtype=dtype, device="cpu")

    model, names = build_on_meta(path, config, dtype, make, skip=skip, model_class=model_class)
    fill_from_safetensors(model, path, set(names), dtype)
    _mark(model, compute_dtype, double_quant, blocksize, names)
    return model.eval()


def require_safetensors(path: str | Path) -> None:
    if not sorted(Path(path).glob("*.safetensors")):
        raise QuantizationError(f"load_quantized needs a directory with *.safetensors files; {path} has none "
                                "(for other formats load the model, then call quantize_model)")


def build_on_meta(path: str | Path, config, dtype: torch.dtype, make_layer, *, skip: Iterable[str] = DEFAULT_SKIP,
                  model_class=None) -> tuple[nn.Module, list[str]]:
    """The model of `config` on the meta device, each quantizable linear layer replaced by
    `make_layer(name, meta_linear)` (a quantized layer on the CPU). Returns (model, replaced names)."""
    from transformers import AutoModelForCausalLM

    require_safetensors(path)
    with torch.device("meta"):
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=dtype)
    names = require_quantizable(model, skip)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make_layer(name, model.get_submodule(name)))
    return model, names


def fill_from_safetensors(model: nn.Module, path: str | Path, quantized: set[str], dtype: torch.dtype, *,
                          skip_weights: bool = False) -> None:
    """Every tensor of the safetensors files in `path`, read one at a time, into the meta model: the weights of
    the `quantized` layers quantized to NF4 (or, with `skip_weights`, not read at: the layers hold theirs),
    everything else kept in `dtype`; then ties, rebuilt non-persistent buffers and the generation config."""
    path = Path(path)
    expected = set(model.state_dict())
    skip = {f"{name}.weight" for name in quantized} if skip_weights else set()
    for file in sorted(path.glob("*.safetensors")):
        for key, tensor in read_safetensors(file, skip=skip):
            _load_tensor(model, quantized, expected, key, tensor, dtype)
    model.tie_weights()
    _materialize_meta_buffers(model)
    if (path / "generation_config.json").is_file():  # from_config does not read it; generate() needs its tokens
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path: str | Path, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file, one tensor at a time, read with plain reads into fresh memory.

    Not memory-mapped: every page of a mapped file that is read stays in the process's RSS until the mapping
    closes (516 MiB for the embedded model), while a plain read goes through the page cache, which is not
    counted. Tensors named in `skip` are not read. The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        start = 8 + size
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name in skip:  # not read at all
                continue
            if info["dtype"] not in _DTYPES:
                raise QuantizationError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which load_quantized "
                                        "does not read; load the model normally and call quantize_model")
            begin, end = info["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(start + begin)
            if fh.readinto(memoryview(data.numpy())) != end - begin:
                raise QuantizationError(f"{path} is truncated (tensor {name!r})")
            yield name, data.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _load_tensor(model: nn.Module, quantized: set[str], expected: set[str], key: str, tensor: torch.Tensor,
                 dtype: torch.dtype) -> None:
    module_name, _, leaf = key.rpartition(".")
    if module_name in quantized:
        layer = model.get_submodule(module_name)
        if leaf == "weight":
            layer.load_nf4(quantize_nf4(tensor, blocksize=layer.blocksize, double_quant=layer.double_quant))
        elif leaf == "bias":
            layer.bias.data.copy_(tensor)
        return
    if key not in expected:
        raise QuantizationError(f"checkpoint tensor {key!r} has no place in {type(model).__name__}")
    module = model.get_submodule(module_name)
    value = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype)  # read into fresh memory already
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value


def _materialize_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (e.g. rotary inv_freq) are computed in __init__, not stored: rebuild their module."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError as err:
            raise QuantizationError(f"{name} ({type(module).__name__}) has buffers that are not in the checkpoint "
                                    "and cannot be rebuilt; load the model normally and call quantize_model") from err
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise QuantizationError(f"the checkpoint lacks {len(left)} tensors of the model, e.g. {left[:3]}")
