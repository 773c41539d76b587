"""Attention per packed example for training on a CPU (`attention: auto` on packed rows, or `per_example`).

On packed SFT rows transformers' SDPA runs the CPU flash kernel over the whole row under a block-diagonal mask:
it computes every (query, key) pair of the row, across examples, and its bf16 backward is slow. This computes
each example's own causal block, so a row of n examples of length m costs about n·m² instead of (n·m)²: under
bf16 eagerly in fp32 (nothing rounded until the bf16 output, so closer to exact attention than SDPA's bf16
kernel, which rounds q, k and the probabilities), in fp32 through SDPA's causal kernel per example (exact).
Measured in bench/bench_attention_cpu.py (0.51x SDPA's time in bf16, 0.47x in fp32, forward and backward of
one layer, on an AMD EPYC with AVX512-BF16) and bench/bench_train.py (setup speed against speed+sdpa).

The examples are found from position_ids as transformers finds packed sequences (a new one wherever a position
does not follow its predecessor by 1). Everything else (fp16, CUDA, no packing, dropout, a sliding window, a
mask that is not the packing mask) goes to SDPA unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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
    return _per_example(query, key, value, starts, scaling, bf16=bf16), None


def _per_example(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: list[list[int]],
                 scaling: float | None, bf16: bool) -> torch.Tensor:
    """Each example's causal attention, (B, H, T, D) and (B, KV, T, D) -> (B, T, H, D), computed in fp32.

    bf16 (bf16 inputs or bf16 autocast): q, k and v taken as they come (under autocast q and k in the rotary
    embedding's fp32, v in bf16), nothing rounded until the bf16 output; SDPA's bf16 kernel rounds q, k and the
    probabilities too. Closer to exact attention than SDPA, forward and gradients, in less time at these
    lengths, because SDPA's bf16 backward is the slow part and these fp32 matmuls are not
    (bench/bench_attention_cpu.py). fp32: SDPA's causal kernel per example, exact and the faster there.
    The examples are taken by one unbind and one split per row and the outputs joined by one cat, so the
    backward is a stack and a cat per row rather than a zero-filled full-size gradient per example."""
    batch, heads, length, width = query.shape
    groups = key.shape[1]
    scale = scaling if scaling is not None else width ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1) if bf16 else None
    pieces = []
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = (x.float() for x in (query, key, value))
        for row, q_row, k_row, v_row in zip(starts, query.unbind(0), key.unbind(0), value.unbind(0)):
            lengths = [e - s for s, e in zip(row, row[1:])]
            for n, q, k, v in zip(lengths, *(x.split(lengths, dim=1) for x in (q_row, k_row, v_row))):
                if bf16:
                    q = q.view(groups, heads // groups, n, width)  # GQA: each kv head's query heads together
                    scores = torch.matmul(q, k[:, None].transpose(2, 3)) * scale  # (KV, H/KV, n, n)
                    p = torch.softmax(scores.masked_fill(causal[:n, :n], float("-inf")), dim=-1)
                    out = torch.matmul(p, v[:, None]).view(heads, n, width)
                else:
                    out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                         enable_gqa=groups != heads)[0]
                pieces.append(out.transpose(0, 1))
    out = torch.cat(pieces).view(batch, length, heads, width)
    return out.to(torch.bfloat16) if bf16 else out  # bf16 out, as SDPA's


def register() -> str:
    """Register the attention (and SDPA's mask builder under the same name) with transformers; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
