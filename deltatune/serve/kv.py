"""The KV cache of the serving engine: one slot per running request, all slots of a layer in one tensor.

    K[layer], V[layer]: (slots, kv_heads, capacity, head_dim)     request in slot i owns row i

Running requests always hold slots 0..n-1: a finishing request's slot is filled by the last one (one copy of
that request's K/V), so a decode step attends over the views K[:n, :, :L] with no gather and no copy of the
cache. Newly admitted requests take slots n..n+m-1 and are prefilled together. Buffers grow by doubling
(slots) and by 256 positions (capacity), so memory is what the largest batch and longest request need.

The alternative, keeping each request's K/V apart and assembling a padded batch cache every step, copies the
whole cache once per step (566 MB for 64 requests of 192 tokens on SmolLM2-135M in fp32): by the sizes, of
the order of a whole decode step on a 2-core CPU.

The object is handed to the model's attention layers as `past_key_values`: transformers' Llama attention
only calls `update(key, value, layer_idx)` and attends over what it returns. K and V are each stored in the dtype
the attention hands over, as transformers' own cache does: under bf16 autocast over fp32 weights the keys come
out of the rotary embedding in fp32 (bf16 projections times fp32 cos/sin) while the values stay bf16.
"""
from __future__ import annotations

import torch

CAPACITY_STEP = 256


class SlotKVCache:
    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self._rows = slice(0, 0)
        self._positions: torch.Tensor | None = None  # (B, T) write positions, None: 0..T-1 for every row
        self._kv_len = 0
        self.prefix_kv: dict[int, torch.Tensor] = {}  # slot -> (layers, 2, kv_heads, p, head_dim): prefix tuning's

    def prepare(self, rows: slice | torch.Tensor, positions: torch.Tensor | None, kv_len: int) -> None:
        """The next forward writes rows `rows` (a slice, or a tensor of slots: a gather, for a chunked prefill
        whose rows are not contiguous) at `positions` ((B, T); None: 0..T-1) and attends over kv_len keys."""
        self._rows, self._positions, self._kv_len = rows, positions, kv_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new (B, kv_heads, T, head_dim) keys and values; return the keys and values to attend over."""
        k = self._fit(self.k, layer_idx, key)
        v = self._fit(self.v, layer_idx, value)
        rows = self._rows
        if self._positions is None:  # prefill: positions 0..T-1 for every row
            k[rows, :, : key.shape[2]] = key
            v[rows, :, : key.shape[2]] = value
        else:
            slots = rows[:, None] if isinstance(rows, torch.Tensor) else \
                torch.arange(rows.start, rows.stop, device=key.device)[:, None]  # (B, 1)
            k[slots, :, self._positions] = key.transpose(1, 2)  # indexed view is (B, T, kv_heads, head_dim)
            v[slots, :, self._positions] = value.transpose(1, 2)
        for slot, kv in self.prefix_kv.items():  # a prefix row's first p positions hold the adapter's keys and values
            k[slot, :, : kv.shape[3]] = kv[layer_idx, 0].to(k.dtype)
            v[slot, :, : kv.shape[3]] = kv[layer_idx, 1].to(v.dtype)
        return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]

    def write(self, slot: int, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Put k[layer], v[layer] ((kv_heads, n, head_dim): a cached prefix) at positions 0..n-1 of `slot`."""
        for store, parts in ((self.k, k), (self.v, v)):
            for layer, part in enumerate(parts):
                t = self._fit(store, layer, part[None], slots=slot + 1, capacity=part.shape[1])
                t[slot, :, : part.shape[1]] = part

    def row(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of slot `slot`'s first `length` positions, per layer: (kv_heads, length, head_dim)."""
        return [t[slot, :, :length] for t in self.k], [t[slot, :, :length] for t in self.v]

    def _fit(self, store: list[torch.Tensor | None], layer_idx: int, new: torch.Tensor, slots: int | None = None,
             capacity: int | None = None) -> torch.Tensor:
        """`store[layer_idx]`, grown to the rows and positions of this forward (or `slots`, `capacity`), in the
        dtype of `new`."""
        t = store[layer_idx]
        rows = self._rows
        slots = (int(rows.max()) + 1 if isinstance(rows, torch.Tensor) else rows.stop) if slots is None else slots
        capacity = self._kv_len if capacity is None else capacity
        if t is not None and t.shape[0] >= slots and t.shape[2] >= capacity and t.dtype == new.dtype:
            return t
        old_slots, old_cap = (t.shape[0], t.shape[2]) if t is not None else (0, 0)
        new_slots = max(old_slots, 1 << max(slots - 1, 0).bit_length())
        new_cap = max(old_cap, -(-capacity // CAPACITY_STEP) * CAPACITY_STEP)
        grown = torch.zeros((new_slots, new.shape[1], new_cap, new.shape[3]), dtype=new.dtype, device=new.device)
        if t is not None:
            grown[:old_slots, :, :old_cap] = t
        store[layer_idx] = grown
        return grown

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction when a request leaves)."""
        for store in (self.k, self.v):
            for t in store:
                if t is not None:
                    t[dst, :, :length] = t[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.k, self.v) for t in store if t is not None)

    def clear(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
