"""Which examples go in which batch, and the eval split: both pure functions of (seed, epoch).

A resumed run calls `batch_order` with the same (seed, epoch) and skips the batches it already did, so it
sees exactly the batches the interrupted run would have; nothing about the order has to be checkpointed.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

from .records import DataError, Records

T = TypeVar("T")
MEGABATCH = 50  # batches per length-sorted group, as in transformers' LengthGroupedSampler


def _rng(seed: int, epoch: int, purpose: str) -> random.Random:
    # Seeding from a string is stable across processes and Python versions (it hashes with SHA-512).
    return random.Random(f"deltatune:{purpose}:{seed}:{epoch}")


def batch_order(lengths: Sequence[int], batch_size: int, *, group_by_length: bool, seed: int, epoch: int) -> list[list[int]]:
    """Batches of example indices covering every example once; the last batch may be smaller.

    group_by_length: shuffle, cut into mega-batches of 50 * batch_size, sort each by length (longest
    first) and cut into batches, then shuffle the batches. Batches hold examples of similar length, so
    less padding, while which examples meet still changes every epoch.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    rng = _rng(seed, epoch, "batches")
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    if not group_by_length:
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    span = MEGABATCH * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(indices), span):
        group = sorted(indices[start : start + span], key=lambda i: -lengths[i])  # stable: ties keep shuffle order
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def split_eval(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): a random `fraction` of items held out, at least one of each when fraction > 0.

    Split records rather than tokenized examples where possible: the chunks of one long text would
    otherwise land on both sides. Records from `load_records` stay Records, so errors still say file:line.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(items), []
    if len(items) < 2:
        raise DataError(f"data.eval_fraction {fraction} needs at least 2 examples to split, found {len(items)}; "
                        "set data.eval_fraction 0 or give data.eval a file")
    indices = list(range(len(items)))
    _rng(seed, 0, "eval").shuffle(indices)
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(indices[:count])
    return _subset(items, [i for i in range(len(items)) if i not in held]), _subset(items, sorted(held))


def _subset(items: Sequence[T], keep: list[int]) -> list[T]:
    if isinstance(items, Records):
        return Records([items[i] for i in keep], items.source, [items.locations[i] for i in keep])
    return [items[i] for i in keep]
