"""Attention per packed example for bf16 training on a CPU.

On packed SFT rows transformers' SDPA runs the CPU flash kernel over the whole row under a block-diagonal mask:
it computes every (query, key) pair of the row, across examples, and its bf16 backward is slow. This computes
each example's own causal block, so a row of n examples of length m costs about n·m² instead of (n·m)²: under
bf16 autocast eagerly, q·kᵀ and the softmax in fp32 (as the flash kernel accumulates them) and P·V in bf16, the
kernels that run fast here; in fp32 through SDPA's causal kernel per example (exact). Measured in
bench/bench_attention_cpu.py (0.53x SDPA's time in bf16, 0.63x in fp32, on an AMD EPYC with AVX512-BF16) and
bench/bench_train.py (setup speed+segments).

The examples are found from position_ids as transformers finds packed sequences (a new one wherever a position
does not follow its predecessor by 1). Everything else (fp16, CUDA, no packing, dropout, a sliding window, a
mask that is not the packing mask) goes to SDPA unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

NAME = "deltatune_packed"


def _starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the first index of each packed example (and the row's length last)."""
    new = torch.ones_like(position_ids, dtype=torch.bool)
    new[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    length = position_ids.shape[-1]
    return [row.nonzero().flatten().tolist() + [length] for row in new]


class _Plan:
    """The examples of one forward's rows, found once and shared by every layer (same position_ids object)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.starts: list[list[int]] | None = None

    def get(self, position_ids: torch.Tensor, mask: torch.Tensor | None, batch: int) -> list[list[int]] | None:
        key = (position_ids, mask, batch)
        if self.key is not None and self.key[0] is position_ids and self.key[1] is mask and self.key[2] == batch:
            return self.starts
        # transformers' own position_ids (no packing) are one row for the whole batch: each row one example
        starts = _starts(position_ids.expand(batch, -1))
        if mask is not None and not _is_packing_mask(mask, starts):
            starts = None
        self.key, self.starts = key, starts
        return starts


def _is_packing_mask(mask: torch.Tensor, starts: list[list[int]]) -> bool:
    """Whether a (B, 1, T, T) bool mask allows exactly each example's causal block (a padding or custom mask
    is not computed per example here)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    length = mask.shape[-1]
    expected = torch.zeros(mask.shape[0], length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, row in enumerate(starts):
        for s, e in zip(row, row[1:]):
            expected[b, s:e, s:e] = causal[: e - s, : e - s]
    return torch.equal(mask[:, 0].expand_as(expected).cpu(), expected)


_plan = _Plan()


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, T, D), key and value (B, KV, T, D) -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    autocast = torch.is_autocast_enabled("cpu")
    bf16 = query.dtype == torch.bfloat16 or (autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    fp32 = query.dtype == torch.float32 and not autocast
    plain = (query.device.type != "cpu" or not (bf16 or fp32) or dropout or position_ids is None
             or position_ids.shape[-1] != query.shape[2] or key.shape[2] != query.shape[2]
             or getattr(module, "sliding_window", None) or kwargs.get("softcap") or kwargs.get("s_aux") is not None)
    starts = None if plain else _plan.get(position_ids, attention_mask, query.shape[0])
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, width = query.shape
    groups = key.shape[1]
    scale = scaling if scaling is not None else width ** -0.5
    if fp32:  # SDPA's own causal kernel on each example: exact, and it skips the masked blocks
        out = query.new_empty(batch, length, heads, width)
        for b, row in enumerate(starts):
            for s, e in zip(row, row[1:]):
                out[b, s:e] = torch.nn.functional.scaled_dot_product_attention(
                    query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], is_causal=True,
                    scale=scale, enable_gqa=groups != heads)[0].transpose(0, 1)
        return out, None
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    # as SDPA under autocast: q, k, v rounded to bf16 first (after the rotary embedding's fp32), then the
    # scores accumulated in fp32
    query, key, value = (x.to(torch.bfloat16) for x in (query, key, value))
    out = query.new_empty(batch, length, heads, width)
    with torch.autocast("cpu", enabled=False):
        for b, row in enumerate(starts):
            for s, e in zip(row, row[1:]):
                n = e - s
                q = query[b, :, s:e].float().view(groups, heads // groups, n, width)
                k, v = key[b, :, s:e].float(), value[b, :, s:e]
                scores = torch.matmul(q, k[:, None].transpose(2, 3)) * scale  # (KV, H/KV, n, n) fp32
                p = torch.softmax(scores.masked_fill(causal[:n, :n], float("-inf")), dim=-1).to(value.dtype)
                out[b, s:e] = torch.matmul(p, v[:, None]).reshape(heads, n, width).transpose(0, 1)
    return out, None


def register() -> str:
    """Register the attention (and SDPA's mask builder under the same name) with transformers; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
