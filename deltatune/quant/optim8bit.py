"""8-bit blockwise AdamW states (Dettmers et al. 2022, 2110.02861) and what optimizer states cost.

AdamW keeps two states per trainable weight, m and v: 8 bytes per weight in fp32. The 8-bit version stores
each as uint8 codes of bitsandbytes' dynamic map (signed for m, unsigned for v) in blocks of 256 with an
fp32 absmax per block, dequantizing, updating and requantizing them at every step: 2 + 8/256 bytes per
weight. Tensors under `min_8bit_size` elements (4096, bnb's default: biases, norms) keep fp32 states.

We use bitsandbytes' `AdamW8bit`, whose CPU kernels (0.50) track 32-bit AdamW closely (tests/test_quant_optim.py
checks the loss curve). Paged optimizers (states in CUDA unified memory, paged to host RAM under memory
pressure, QLoRA §3) exist only on CUDA; on CPU there is nothing to page to, and asking for them is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

MIN_8BIT_SIZE = 4096  # bnb: smaller tensors keep 32-bit states
STATE_BLOCKSIZE = 256  # bnb's blockwise optimizer block


class OptimizerUnavailableError(RuntimeError):
    """An optimizer that cannot run here (no bitsandbytes, or a paged optimizer without CUDA)."""


def adamw8bit(params: Iterable[torch.Tensor] | Iterable[dict], *, lr: float = 1e-3,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              paged: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> torch.optim.Optimizer:
    """AdamW with 8-bit blockwise states (bitsandbytes' `AdamW8bit`; `PagedAdamW8bit` when `paged`).

    Same arguments and update as torch.optim.AdamW (decoupled weight decay); parameter groups work as there.
    """
    return bnb_adamw(params, bits=8, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, paged=paged,
                     min_8bit_size=min_8bit_size)


def bnb_adamw(params: Iterable[torch.Tensor] | Iterable[dict], *, bits: int = 8, lr: float = 1e-3,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              paged: bool = False, min_8bit_size: int = MIN_8BIT_SIZE) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with `bits` (8 or 32) states, paged (CUDA unified memory) or not: `AdamW8bit`,
    `PagedAdamW8bit`, `PagedAdamW32bit` (QLoRA's `paged_adamw_32bit`) or `AdamW32bit`."""
    if bits not in (8, 32):
        raise ValueError(f"bits must be 8 or 32, got {bits}")
    params = list(params)
    if paged:
        devices = {p.device.type for p in _tensors(params)}
        if devices != {"cuda"}:
            raise OptimizerUnavailableError(
                f"paged optimizers need CUDA (their states live in CUDA unified memory, paged to host RAM under "
                f"memory pressure), but the parameters are on {', '.join(sorted(devices))}: on CPU the states "
                "already live in host RAM, so use the unpaged optimizer (optim.name: adamw_8bit or adamw).")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise OptimizerUnavailableError(
            "8-bit AdamW uses bitsandbytes: pip install 'bitsandbytes>=0.50' (0.50 runs on CPU too), or use the "
            "32-bit AdamW") from err
    cls = {(8, True): bnb.optim.PagedAdamW8bit, (8, False): bnb.optim.AdamW8bit,
           (32, True): bnb.optim.PagedAdamW32bit, (32, False): bnb.optim.AdamW32bit}[bits, paged]
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)


def _tensors(params: list) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


def adamw_state_bytes(shapes: Iterable[int | torch.Size], *, bits: int = 32,
                      min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of AdamW's m and v for tensors of these sizes (element counts or shapes): 8 per weight at
    32 bits; at 8 bits, 2 per weight plus two fp32 absmax per 256-block (tensors below `min_8bit_size`: 32-bit)."""
    if bits not in (8, 32):
        raise ValueError(f"bits must be 8 or 32, got {bits}")
    total = 0
    for shape in shapes:
        n = shape if isinstance(shape, int) else torch.Size(shape).numel()
        if bits == 32 or n < min_8bit_size:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // STATE_BLOCKSIZE)
    return total


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds in its state now (shared code maps counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                seen.setdefault(id(value), value)
    return sum(t.numel() * t.element_size() for t in seen.values())


@dataclass(frozen=True)
class OptimizerMemory:
    """AdamW state bytes for full fine-tuning and for a set of adapter parameters, at 32 and 8 bits."""

    full_params: int
    full_32bit: int
    full_8bit: int
    adapter_params: int
    adapter_32bit: int
    adapter_8bit: int

    def table(self) -> str:
        mb = lambda b: f"{b / 2**20:9.1f} MiB"  # noqa: E731
        return "\n".join([
            f"{'':22s}{'params':>12s}{'32-bit AdamW':>15s}{'8-bit AdamW':>15s}",
            f"{'full fine-tuning':22s}{self.full_params:12,d}{mb(self.full_32bit):>15s}{mb(self.full_8bit):>15s}",
            f"{'adapter':22s}{self.adapter_params:12,d}{mb(self.adapter_32bit):>15s}{mb(self.adapter_8bit):>15s}",
        ])


def lora_shapes(model: nn.Module, r: int, names: Iterable[str]) -> list[torch.Size]:
    """Shapes of LoRA's A (r, in) and B (out, r) on the named linear (or Linear4bit) layers."""
    shapes = []
    for name in names:
        module = model.get_submodule(name)
        shapes += [torch.Size((r, module.in_features)), torch.Size((module.out_features, r))]
    return shapes


def optimizer_memory(model: nn.Module, adapter_shapes: Iterable[torch.Size]) -> OptimizerMemory:
    """Optimizer-state bytes of full fine-tuning (every parameter of `model`, tied ones once) against training
    only tensors of `adapter_shapes` (e.g. `lora_shapes(model, 16, quantizable_linears(model))`)."""
    full = [p.shape for p in {id(p): p for p in model.parameters()}.values()]
    adapter = list(adapter_shapes)
    count = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    return OptimizerMemory(
        full_params=count(full), full_32bit=adamw_state_bytes(full), full_8bit=adamw_state_bytes(full, bits=8),
        adapter_params=count(adapter), adapter_32bit=adamw_state_bytes(adapter),
        adapter_8bit=adamw_state_bytes(adapter, bits=8))
