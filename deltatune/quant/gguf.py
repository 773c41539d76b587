"""A lossless 4-bit base from a GGUF file: the file's Q4_1 blocks kept as the frozen layers' storage.

The embedded SmolLM2 ships as `SmolLM2-135M-Instruct.Q4_1.gguf`; its "16-bit" base is those blocks dequantized
to fp32 (transformers' GGUF loader, through the gguf package). NF4 would re-quantize weights that already lie
on another 4-bit grid (+5.1% text loss, docs/qlora.md). `LinearQ4_1` keeps the blocks instead:

    Q4_1 block (llama.cpp / ggml, 20 bytes per 32 weights: 5 bits per weight)
        d  float16       scale            w_j = d · q_j + m,   q_j ∈ {0, …, 15}
        m  float16       minimum
        qs uint8 × 16    byte j holds q_j in its low nibble and q_{j+16} in its high nibble

and dequantizes per layer and per forward, like `Linear4bit`: fp16 → fp32 (exact), then one fp32 multiply and
one fp32 add, each rounded once, as gguf-py's `Q4_1.dequantize_blocks` computes them in numpy (no fused
multiply-add: `torch.addcmul` could round once instead of twice). So the fp32 dequantized weight is bit for
bit the weight of the fp32 base, and its bf16 cast bit for bit the bf16-stored base's (`frozen_bf16`).

Rows: transformers reverses llama.cpp's rotary permutation of attn_q / attn_k rows (`LlamaTensorProcessor`).
A block lies inside one row (ne0, the input dimension, is the contiguous one), so the same row permutation is
applied to the blocks, losslessly. Llama-family files only; a linear weight stored in any other block type
(Q4_0, Q8_0, Q4_K, F16, ...) is refused by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .linear4bit import QuantizedLinear

Q4_1_BLOCK = 32  # weights per block
Q4_1_BYTES = 20  # d (2) + m (2) + 16 bytes of nibbles

# gguf tensor name (after "blk.{i}.") -> transformers Llama module name (after "model.layers.{i}.")
LLAMA_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFError(ValueError):
    """A GGUF file or tensor deltatune cannot keep as a lossless 4-bit base; the message names it."""


class LinearQ4_1(QuantizedLinear):
    """A frozen linear layer whose weight is stored in GGUF Q4_1 blocks (scale and minimum per 32 weights).

    State dict (buffers): `weight_qs` uint8 (out, in/32, 16), `weight_d` and `weight_m` float16 (out, in/32),
    rows in transformers' order. `bias`: a frozen parameter, if any. Follows the core's base-weight protocol.
    """

    state_names = ("weight_qs", "weight_d", "weight_m")
    storage = "GGUF Q4_1"
    blocksize = Q4_1_BLOCK

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % Q4_1_BLOCK:
            raise GGUFError(f"Q4_1 blocks hold {Q4_1_BLOCK} weights of a row; in_features={in_features} is not a multiple")
        if not compute_dtype.is_floating_point:
            raise TypeError(f"compute_dtype must be a float dtype (torch.bfloat16, torch.float32), got {compute_dtype}")
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        blocks = in_features // Q4_1_BLOCK
        self.register_buffer("weight_qs", torch.zeros(out_features, blocks, 16, dtype=torch.uint8, device=device))
        self.register_buffer("weight_d", torch.zeros(out_features, blocks, dtype=torch.float16, device=device))
        self.register_buffer("weight_m", torch.zeros(out_features, blocks, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    def load_blocks(self, blocks: Tensor) -> None:
        """Fill from raw Q4_1 blocks, uint8 (out, in/32 · 20) or (out, in/32, 20), rows in transformers' order."""
        blocks = blocks.reshape(self.out_features, -1, Q4_1_BYTES)
        if blocks.dtype != torch.uint8 or blocks.shape[1] != self.weight_qs.shape[1]:
            raise GGUFError(f"Q4_1 blocks of shape {tuple(blocks.shape)} ({blocks.dtype}) do not fit {self!r}")
        with torch.no_grad():
            self.weight_d.copy_(blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1))
            self.weight_m.copy_(blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1))
            self.weight_qs.copy_(blocks[..., 4:])

    @torch.no_grad()
    def dequantize_weight(self) -> Tensor:
        """d·q + m in fp32 (two roundings, as gguf-py), (out, in), cast to `compute_dtype`; a new tensor."""
        qs = self.weight_qs
        q = torch.empty(*qs.shape[:2], 2, 16, dtype=torch.float32, device=qs.device)  # (out, blocks, 2, 16)
        q[:, :, 0].copy_(qs & 0x0F)
        q[:, :, 1].copy_(qs >> 4)
        q = q.view(*qs.shape[:2], Q4_1_BLOCK)
        q.mul_(self.weight_d.float().unsqueeze(-1)).add_(self.weight_m.float().unsqueeze(-1))
        weight = q.view(self.out_features, self.in_features)
        return weight if self.compute_dtype == torch.float32 else weight.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gguf q4_1, compute_dtype={self.compute_dtype}")


def reverse_rotary_permutation(rows: Tensor, n_head: int) -> Tensor:
    """transformers' `_reverse_permute_weights` on the first dimension (rows of q_proj or k_proj, with any
    trailing shape): (n_head, 2, dim, ...) -> (n_head, dim, 2, ...)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def llama_linear_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj`; None for tensors that are not linear layers."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in LLAMA_LINEARS:
        return f"model.layers.{parts[1]}.{LLAMA_LINEARS[parts[2]]}"
    return None


def read_q4_1_blocks(path: str | Path, config: Any) -> dict[str, Tensor]:
    """Module name -> raw Q4_1 blocks, uint8 (out, in/32 · 20), of every linear layer of the Llama GGUF file
    `path`, rows in transformers' order (`config`: the model's, for the attention heads). Memory-mapped reads,
    copied out. Refuses a linear weight in any other block type, naming it and its type."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError as err:
        raise ImportError("a GGUF base needs the `gguf` package: pip install 'gguf>=0.10'") from err
    reader = GGUFReader(str(path))
    out: dict[str, Tensor] = {}
    for tensor in reader.tensors:
        name = llama_linear_name(tensor.name)
        if name is None:
            continue
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            raise GGUFError(f"{Path(path).name}: tensor {tensor.name} is stored as {tensor.tensor_type.name}; only "
                            "Q4_1 blocks are kept as a 4-bit base (load the model without quantize='gguf')")
        blocks = torch.from_numpy(tensor.data.copy())  # (out, in/32 · 20) uint8
        if tensor.name.split(".")[2] == "attn_q":
            blocks = reverse_rotary_permutation(blocks, config.num_attention_heads)
        elif tensor.name.split(".")[2] == "attn_k":
            blocks = reverse_rotary_permutation(blocks, config.num_key_value_heads)
        out[name] = blocks.contiguous()
    return out


def load_gguf_base(gguf_path: str | Path, model_dir: str | Path, *, compute_dtype: torch.dtype = torch.float32,
                   dtype: torch.dtype = torch.float32, model_class=None) -> nn.Module:
    """The model of `model_dir` (transformers' conversion of `gguf_path`: config, norms, embeddings) with every
    linear layer but the head a `LinearQ4_1` holding the GGUF file's own blocks. Streamed like
    `load_quantized`: the converted fp32 linear weights are skipped, never read. Returns the model in eval mode."""
    from transformers import AutoConfig

    from .load import build_on_meta, fill_from_safetensors
    from .model import _mark

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "model_type", None) not in ("llama",):
        raise GGUFError(f"a GGUF 4-bit base is supported for Llama-family models; {model_dir} is "
                        f"{getattr(config, 'model_type', '?')!r}")
    blocks = read_q4_1_blocks(gguf_path, config)

    def make(name: str, linear: nn.Linear) -> nn.Module:
        if name not in blocks:
            raise GGUFError(f"{Path(gguf_path).name} has no tensor for {name}")
        layer = LinearQ4_1(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=compute_dtype, bias_dtype=dtype, device="cpu")
        layer.load_blocks(blocks.pop(name))
        return layer

    model, names = build_on_meta(model_dir, config, dtype, make, model_class=model_class)
    fill_from_safetensors(model, model_dir, set(names), dtype, skip_weights=True)
    if blocks:
        raise GGUFError(f"{Path(gguf_path).name} holds linear tensors the model has no layer for, e.g. {sorted(blocks)[0]}")
    mark_gguf(model, compute_dtype, names)
    return model.eval()


def mark_gguf(model: nn.Module, compute_dtype: torch.dtype, names: Iterable[str]) -> None:
    """`model.deltatune_quantization`, which the adapter file's metadata records ("gguf-q4_1")."""
    model.deltatune_quantization = {"name": "gguf-q4_1", "quant_type": "q4_1", "blocksize": Q4_1_BLOCK,
                                    "double_quant": False, "compute_dtype": str(compute_dtype).removeprefix("torch."),
                                    "modules": len(list(names))}
