"""`Linear4bit`: a frozen linear layer whose weight is stored in NF4 (QLoRA §3), computing in bf16 or fp32.

    y = x · dequant(W_NF4)ᵀ + b        dequantize, then F.linear in `compute_dtype`

The layer keeps no dequantized weight: the forward dequantizes into a temporary, and the backward
dequantizes again to form dL/dx = dL/dy · W rather than saving W for later (QLoRA's memory argument: the
fp32/bf16 weight of every layer would otherwise live until the backward). The weight gets no gradient.

It follows the core's base-weight protocol (`deltatune.core.sites.BaseWeight`): `in_features`,
`out_features`, `weight_shape`, `compute_dtype`, `dequantize_weight()`, `quantized = True`; `set_weight`
refuses an in-place merge. It deliberately has no `.weight`, and is not an nn.Linear, so nothing mistakes
the packed codes for a float weight.

State dict (buffers, so `.to(device)`, `state_dict()` and `load_state_dict()` work as for any module):
    weight_nf4      uint8 (ceil(out·in/2),)   two codes per byte, bnb's layout
    weight_absmax   uint8 (n_blocks,) with double quantization, else float32 (n_blocks,)
    weight_absmax2  float32 (ceil(n_blocks/256),)   DQ only
    weight_offset   float32 ()                      DQ only
    bias            the original bias (a frozen parameter, its own dtype), if any
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nf4 import BLOCKSIZE, BLOCKSIZE2, NF4Tensor, dequantize_nf4, quantize_nf4

_STATE = ("weight_nf4", "weight_absmax", "weight_absmax2", "weight_offset")


class QuantizedWeightError(AttributeError):
    """Reading or writing the float weight of a 4-bit layer, which does not hold one."""


class _DequantizedLinear(torch.autograd.Function):
    """F.linear(x, dequant(W), b) that saves the packed weight, not the dequantized one, for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: "Linear4bit") -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(*layer.state_tensors())  # detects an in-place change
        return F.linear(x, layer.dequantize_weight(), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018  (raises if the codes were modified since the forward)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # in grad_out's dtype: bf16 under autocast even for an fp32 compute dtype
            grad_x = grad_out @ ctx.layer.dequantize_weight().to(grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantizedLinear(nn.Module):
    """What every frozen quantized linear layer shares: the forward through `_DequantizedLinear`, no float
    `.weight`, an in-place merge refused, storage tensors that `.to(dtype)` never casts. A subclass names its
    storage buffers in `state_names`, says what it stores in `storage`, and implements `dequantize_weight()`."""

    quantized: ClassVar[bool] = True
    state_names: ClassVar[tuple[str, ...]] = ()
    storage: ClassVar[str] = ""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype

    def state_tensors(self) -> list[Tensor]:
        """The storage buffers (codes and constants) that are set."""
        return [t for t in (getattr(self, name) for name in self.state_names) if t is not None]

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantize_weight(self) -> Tensor:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def set_weight(self, weight: Tensor) -> None:
        raise QuantizedWeightError(
            f"{type(self).__name__}({self.in_features}→{self.out_features}) stores its weight in {self.storage}: an "
            "in-place merge into it is refused, because re-quantizing W + ΔW cannot be undone exactly (unmerge would "
            "not give back the weights the adapter was trained on). Merge into a dequantized copy instead: "
            "deltatune.merge_and_unload(model), or deltatune.quant.dequantize_model(model) and then merge.")

    def __getattr__(self, name: str):
        if name == "weight":  # hasattr(layer, "weight") is False, with a message for whoever reads it
            raise QuantizedWeightError(
                f"{type(self).__name__} has no float `.weight`: its weight is stored as {self.storage} codes. Use "
                "`dequantize_weight()` for the (out, in) weight in compute_dtype.")
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        """Under autocast the result has the autocast dtype, as nn.Linear's would (an fp32 result would make
        every activation after it fp32: twice the memory, slower elementwise ops); else x's dtype."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return _DequantizedLinear.apply(x.to(self.compute_dtype), bias, self).to(out_dtype)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` move the codes and constants but never cast them: a bf16 absmax would
        lose precision the dequantized values depend on. The bias follows the model's dtype as usual."""
        before = {name: getattr(self, name) for name in self.state_names if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


class Linear4bit(QuantizedLinear):
    """A frozen NF4 linear layer. Build it with `Linear4bit.from_linear(linear, compute_dtype=...)`.

    compute_dtype: dtype of the dequantized weight and of the matmul (QLoRA: bf16). The input is cast to it
        and the output cast back to the input's dtype, so the layer fits any model dtype.
    double_quant: quantize the 64-block absmax constants too (QLoRA §3, 4.127 instead of 4.5 bits/weight).
    """

    state_names = _STATE
    storage = "NF4"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                 blocksize: int = BLOCKSIZE, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not compute_dtype.is_floating_point:
            raise TypeError(f"compute_dtype must be a float dtype (torch.bfloat16, torch.float32), got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.double_quant, self.blocksize = compute_dtype, double_quant, blocksize
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight_nf4", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax2", torch.zeros(-(-n_blocks // BLOCKSIZE2), device=device))
            self.register_buffer("weight_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, device=device))
            self.register_buffer("weight_absmax2", None)
            self.register_buffer("weight_offset", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype = torch.float32,
                    double_quant: bool = True, blocksize: int = BLOCKSIZE) -> "Linear4bit":
        """Quantize `linear.weight` (any float dtype) into a new layer on the same device; the bias is kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear needs an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        if weight.is_meta:
            raise ValueError("Linear4bit.from_linear got a weight on the meta device: load the weights first")
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, compute_dtype=compute_dtype,
                    double_quant=double_quant, blocksize=blocksize,
                    bias_dtype=bias.dtype if bias is not None else torch.float32, device=weight.device)
        layer.load_nf4(quantize_nf4(weight.detach(), blocksize=blocksize, double_quant=double_quant))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    # ---- the NF4 state ------------------------------------------------------------------------------
    def nf4(self) -> NF4Tensor:
        """The stored weight as an `NF4Tensor` (views of the buffers, no copy)."""
        return NF4Tensor(self.weight_nf4, self.weight_absmax, self.weight_shape, self.compute_dtype,
                         self.blocksize, self.weight_absmax2, self.weight_offset)

    def load_nf4(self, state: NF4Tensor) -> None:
        if tuple(state.shape) != tuple(self.weight_shape) or state.double_quant != self.double_quant \
                or state.blocksize != self.blocksize:
            raise ValueError(f"NF4 state of shape {tuple(state.shape)} (double_quant={state.double_quant}, blocksize="
                             f"{state.blocksize}) does not fit {self!r}")
        with torch.no_grad():
            for name, tensor in zip(_STATE, (state.packed, state.absmax, state.absmax2, state.offset)):
                if tensor is not None:
                    getattr(self, name).copy_(tensor)

    # ---- the core's base-weight protocol (the rest in QuantizedLinear) -------------------------------
    @torch.no_grad()
    def dequantize_weight(self) -> Tensor:
        """The weight (out, in) in `compute_dtype`, a new tensor without grad."""
        return dequantize_nf4(self.nf4(), self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
