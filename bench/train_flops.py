"""Counted FLOPs of one LoRA training step, and the matmul rate this CPU reaches on the same shapes.

A step is counted as the matmuls it must do (elementwise work is left out: it is what the limit excludes):

    frozen linear (in -> out), N tokens:   forward 2·N·in·out, input gradient 2·N·in·out (no weight gradient)
    LoRA rank r on it:                     forward 2·N·r·(in+out), backward 2x the forward (both factors' gradients
                                           and the input gradient)
    attention, B rows of T, nh heads of hd: forward Q·Kᵀ and P·V, 4·B·nh·T²·hd (the dense T x T the kernel runs
                                           with a mask), backward 2x the forward; computed per packed example
                                           (deltatune.train.attention), Σ 4·nh·n²·hd over the examples' lengths n
    output head (H -> V), M rows:          forward 2·M·H·V, input gradient 2·M·H·V (tied to the frozen embedding)
    gradient checkpointing:                the decoder's forward once more (or the share of it recomputed)

where M is every position for the full-logits loss and the labelled ones for the chunked loss. No input gradient
is needed below layer 0's linears that read the embedding (q, k, v, gate, up: nothing there requires grad).

`matmul_limit` times each distinct matmul of that list as a bare `torch.mm` (the step's shapes, dtype and
threads; each repeat's time is min(wall, process CPU / threads)) and returns the seconds a step would take if
every matmul ran at the rate its shape reaches here: step FLOPs / that time is the machine's limit for the
step, and limit time / measured step time is the share of it the step reaches.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

# (N, K, M): an (N, K) @ (K, M) product; its FLOPs are 2·N·K·M
Shape = tuple[int, int, int]


@dataclass(frozen=True)
class StepShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rows: int  # B
    length: int  # T
    head_rows: int  # M: positions that go through the output head
    rank: int  # LoRA r on every linear of every layer
    recompute: float  # share of the decoder's forward that gradient checkpointing runs again (0, 0.5, 1)
    examples: tuple[int, ...] = ()  # attention per packed example: every example's length; () = dense rows

    @classmethod
    def of(cls, config, rows: int, length: int, head_rows: int, rank: int, recompute: float,
           examples: tuple[int, ...] = ()) -> "StepShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.vocab_size, rows, length, head_rows, rank, recompute,
                   examples)

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one decoder layer's linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [("q", h, q), ("k", h, kv), ("v", h, kv), ("o", q, h), ("gate", h, i), ("up", h, i), ("down", i, h)]


def step_matmuls(s: StepShape) -> dict[str, list[tuple[Shape, int]]]:
    """Per part of the step: [(matmul shape, how many times it runs per step)]."""
    n = s.rows * s.length
    forwards = 1 + s.recompute
    parts: dict[str, list[tuple[Shape, int]]] = defaultdict(list)
    for name, d_in, d_out in s.linears():
        reads_embedding = name in ("q", "k", "v", "gate", "up")
        parts["frozen linears"] += [((n, d_in, d_out), s.layers * forwards),  # x @ W0ᵀ
                                    ((n, d_out, d_in), s.layers - reads_embedding)]  # grad_y @ W0
        if s.rank:
            r = s.rank
            parts["LoRA"] += [((n, d_in, r), s.layers * forwards), ((n, r, d_out), s.layers * forwards),  # A x, B(.)
                              ((r, n, d_out), s.layers), ((n, d_out, r), s.layers),  # grad B, grad of (A x)
                              ((r, n, d_in), s.layers), ((n, r, d_in), s.layers - reads_embedding)]  # grad A, input
    blocks = s.examples or (s.length,) * s.rows  # per (block, head): (n, hd) @ (hd, n), then (n, n) @ (n, hd)
    for n, count in sorted(Counter(blocks).items()):
        qk = ((n, s.head_dim, n), count * s.heads * s.layers)
        pv = ((n, n, s.head_dim), count * s.heads * s.layers)
        parts["attention"] += [(qk[0], qk[1] * forwards), (pv[0], pv[1] * forwards), (qk[0], 2 * qk[1]),
                               (pv[0], 2 * pv[1])]
    parts["head"] += [((s.head_rows, s.hidden, s.vocab), 1), ((s.head_rows, s.vocab, s.hidden), 1)]
    return dict(parts)


def flops(parts: dict[str, list[tuple[Shape, int]]]) -> dict[str, float]:
    return {part: sum(2.0 * a * b * c * times for (a, b, c), times in mms) for part, mms in parts.items()}


def _rate(shape: Shape, dtype: torch.dtype, seconds: float = 0.15) -> float:
    """FLOP/s of a bare (N, K) @ (K, M) mm here, best of a few timed repeats after a warm-up. Each repeat counts
    min(wall, process CPU / threads) seconds: on a loaded machine the wall clock also counts the wait for a core."""
    a, b, c = shape
    x, w = torch.randn(a, b).to(dtype), torch.randn(b, c).to(dtype)
    torch.mm(x, w)
    threads = torch.get_num_threads()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(x, w)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        best, spent = min(best, wall, cpu / threads if cpu > 0 else wall), spent + wall
    return 2.0 * a * b * c / best


def matmul_limit(parts: dict[str, list[tuple[Shape, int]]], dtype: torch.dtype, chunk: int = 0) -> dict[str, float]:
    """Seconds per part if each of its matmuls ran at the rate this machine reaches on its shape; `chunk`: the head
    runs in chunks of that many rows (the chunked loss), so its rate is measured on a chunk."""
    rates: dict[Shape, float] = {}
    limit: dict[str, float] = {}
    for part, mms in parts.items():
        total = 0.0
        for shape, times in mms:
            timed = shape
            if part == "head" and chunk and shape[0] > chunk:
                timed = (chunk, *shape[1:])
            if timed not in rates:
                rates[timed] = _rate(timed, dtype)
            total += 2.0 * shape[0] * shape[1] * shape[2] * times / rates[timed]
        limit[part] = total
    return limit
