"""Packing short examples into full rows, and collating examples into padded tensors.

Packing puts several examples in one row of at most max_length tokens, so a batch of short chats is not
mostly padding. Each example must still see only itself. A packed row carries `position_ids` that restart
at 0 for each example:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2 c3
    position_ids   0  1  2  0  1  0  1  2  3

Recent transformers (checked on 5.23: `masking_utils.find_packed_sequence_indices`) reads such
position_ids as packed sequences and builds a block-diagonal causal mask for eager and sdpa attention
(flash-attention takes them as varlen boundaries) - but ONLY when the forward gets `attention_mask=None`
and no cache. A Llama forward creates a DynamicCache whenever `use_cache` is on,
which is the config default even in train mode, and with a cache the detection is skipped and examples
attend across their boundaries. So a packed batch must be run with

    model(input_ids=..., position_ids=..., use_cache=False)      # what `collate` returns: no attention_mask

(tests/test_data.py checks that the logits then equal each example run alone). For an older transformers,
or any model whose masking does not detect packing, `collate(..., block_mask=True)` builds the
block-diagonal mask explicitly as a 4D additive float mask, (B, 1, L, L), which transformers passes
through unchanged; it costs B*L*L floats.

Labels: the first token of each packed example gets IGNORE_INDEX, otherwise the shifted loss would train
the last token of one example to predict the first of the next. Unpacked, that label is never used anyway.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch

from .chat import IGNORE_INDEX
from .encode import Example
from .records import DataError


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Rows of at most `max_length` tokens, each the concatenation of whole examples (best-fit decreasing).

    Best-fit decreasing (longest example first, into the fullest row it fits) fills rows nearly
    completely at O(n log n); the row order does not matter because `batch_order` shuffles. Deterministic.
    """
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (free tokens, row) sorted, so bisect finds the tightest fit
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    for i in order:
        length = len(examples[i]["input_ids"])
        if length > max_length:
            raise DataError(f"example {i} has {length} tokens, more than the packing row length {max_length}; "
                            "tokenize with the same data.max_length")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    return [_concat([examples[i] for i in row]) for row in rows]


def _concat(parts: Sequence[Example]) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for part in parts:
        input_ids += part["input_ids"]
        labels += [IGNORE_INDEX] + list(part["labels"][1:])
        position_ids += range(len(part["input_ids"]))
    return Example(input_ids=input_ids, labels=labels, position_ids=position_ids)


def collate(examples: Sequence[Example], pad_id: int, *, block_mask: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded tensors (B, L), L the longest example of the batch.

    Unpacked examples: input_ids, labels (IGNORE_INDEX on padding), attention_mask (1 = token, 0 = pad).
    Packed rows (any example with position_ids): input_ids, labels, position_ids and NO attention_mask,
    so transformers isolates the examples (run the forward with use_cache=False, see the module doc);
    padding gets positions 0, 1, ... and so is a segment of its own that no real token attends to.
    With block_mask=True, packed rows also get attention_mask: the (B, 1, L, L) additive float32 mask.
    """
    if not examples:
        raise DataError("collate got an empty batch")
    if not isinstance(pad_id, int):
        raise DataError(f"collate needs an integer pad_id, got {pad_id!r}; a tokenizer without a pad token can "
                        "pad with its eos_token_id (padding carries no loss and no attention)")
    length = max(len(example["input_ids"]) for example in examples)
    packed = any("position_ids" in example for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.tensor(example.get("position_ids", range(n)), dtype=torch.long)
        position_ids[row, n:] = torch.arange(length - n)
    batch = {"input_ids": input_ids, "labels": labels}
    if not packed:
        batch["attention_mask"] = attention_mask
        return batch
    batch["position_ids"] = position_ids
    if block_mask:
        batch["attention_mask"] = block_diagonal_mask(position_ids)
    return batch


def block_diagonal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 where query i may see key j (same example, j <= i), else dtype's min.

    An example starts wherever a position does not follow its predecessor by exactly 1 - the rule
    transformers' find_packed_sequence_indices uses, so both paths agree.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.cumsum(-1)  # (B, L) example number of each token
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
