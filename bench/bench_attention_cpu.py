"""Attention's forward and backward on a CPU at SmolLM2's shapes on packed SFT rows: the kernels compared.

    python bench/bench_attention_cpu.py --precision bf16 --rounds 5

The profiler puts SDPA (torch's flash kernel for CPU) at ~29% of speed mode's bf16 SFT step (docs/benchmarks.md),
so this times one layer's attention (batch 4x231, 9 query heads, 3 kv heads, head dim 64, q laid out as the
model's projections give it) nine ways, interleaved within each round, process CPU seconds, best per way:
sdpa with the packing mask (what transformers runs), sdpa with GQA done by the kernel, the math backend,
eager (matmul, fp32 softmax, matmul: transformers' "eager"), eager with fp32 scores, per packed segment with
is_causal (varlen), deltatune.train.attention (`attention: per_example`), and the segments as 2 or 3 padded
batches of causal segments (by length; one SDPA call each).
Each row prints its largest difference from the same computation in fp64.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, KV, T, D = 4, 9, 3, 231, 64
SEGMENTS = [[60, 50, 70, 51], [100, 131], [40, 40, 40, 40, 71], [120, 60, 51]]  # 15 segments, as the demo's batch


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(dtype).transpose(1, 2).requires_grad_() for h in (H, KV, KV))
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(s)]) for s in SEGMENTS])
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    return q, k, v, mask


def repeat_kv(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, None].expand(B, KV, H // KV, T, D).reshape(B, H, T, D)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask, scale=D ** -0.5)


def sdpa_gqa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5, enable_gqa=True)


def math_backend(q, k, v, mask):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa(q, k, v, mask)


def eager(q, k, v, mask):
    w = (q @ repeat_kv(k).transpose(2, 3)) * D ** -0.5
    w = torch.softmax(w.masked_fill(~mask, torch.finfo(w.dtype).min), dim=-1, dtype=torch.float32).to(q.dtype)
    return w @ repeat_kv(v)


def eager_fp32_scores(q, k, v, mask):
    """eager with the scores and softmax in fp32 (q, k widened first) and P·V in the inputs' dtype."""
    w = (q.float() @ repeat_kv(k).float().transpose(2, 3)) * D ** -0.5
    w = torch.softmax(w.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    return w @ repeat_kv(v)


POSITIONS = torch.tensor([[p for n in s for p in range(n)] for s in SEGMENTS])


def per_example(q, k, v, mask):
    """deltatune.train.attention (`attention: per_example`), as the model calls it: bf16 with fp32 scores and
    bf16 P·V per packed example, fp32 through SDPA's causal kernel per example."""
    from deltatune.train.attention import packed_attention

    out, _ = packed_attention(torch.nn.Module(), q, k, v, mask, scaling=D ** -0.5, position_ids=POSITIONS)
    return out.transpose(1, 2)


def varlen(q, k, v, mask):
    rows = []
    for b, lengths in enumerate(SEGMENTS):
        parts, start = [], 0
        for n in lengths:
            s = slice(start, start + n)
            kk, vv = (x[b:b + 1, :, None, s].expand(1, KV, H // KV, n, D).reshape(1, H, n, D) for x in (k, v))
            parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, s], kk, vv, is_causal=True, scale=D ** -0.5))
            start += n
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows)


def bucket_plan(buckets: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The segments sorted by length into `buckets` groups, each a padded batch: (positions read (S, L) into the
    flattened B·T rows, a segment's padding repeating its last token; the real ones among them (S, L))."""
    segments = sorted(((b, sum(s[:i]), n) for b, s in enumerate(SEGMENTS) for i, n in enumerate(s)), key=lambda t: t[2])
    cuts = [round(len(segments) * i / buckets) for i in range(buckets + 1)]
    plan = []
    for group in (segments[cuts[i]:cuts[i + 1]] for i in range(buckets)):
        L = max(n for _, _, n in group)
        plan.append((torch.tensor([[b * T + s + min(j, n - 1) for j in range(L)] for b, s, n in group]),
                     torch.tensor([[j < n for j in range(L)] for _, _, n in group])))
    return plan


def bucketed(q, k, v, mask, plan):
    """Per segment again, as a few padded batches of causal segments (padding at a segment's end is never seen
    by its real positions), one SDPA call each: fewer, larger calls than varlen's 15."""
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v)]
    out = torch.zeros(B * T, H, D, dtype=q.dtype)
    for index, real in plan:
        S, L = index.shape
        qs, ks, vs = (x[index.flatten()].view(S, L, -1, D).transpose(1, 2) for x in flat)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=D ** -0.5, enable_gqa=True)
        keep = real.flatten().nonzero().flatten()
        out = out.index_copy(0, index.flatten()[keep], o.transpose(1, 2).reshape(S * L, H, D)[keep])
    return out.view(B, T, H, D).transpose(1, 2)


PLANS = {n: bucket_plan(n) for n in (2, 3)}
WAYS = {"sdpa + packing mask": sdpa, "sdpa, GQA in the kernel": sdpa_gqa, "math backend": math_backend,
        "eager (fp32 softmax)": eager, "eager, fp32 scores, P·V in the inputs' dtype": eager_fp32_scores,
        "varlen (per segment, causal)": varlen, "per example (deltatune.train.attention)": per_example,
        "segments in 2 padded causal batches": lambda q, k, v, mask: bucketed(q, k, v, mask, PLANS[2]),
        "segments in 3 padded causal batches": lambda q, k, v, mask: bucketed(q, k, v, mask, PLANS[3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    q, k, v, mask = inputs(dtype)
    ref = eager(*(x.detach().double() for x in (q, k, v)), mask)
    best: dict[str, tuple[float, float]] = {}
    errors: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in WAYS.items():
            q.grad = k.grad = v.grad = None
            t0 = time.process_time()
            out = fn(q, k, v, mask)
            t1 = time.process_time()
            out.float().sum().backward()
            t2 = time.process_time()
            fw, bw = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(fw, t1 - t0), min(bw, t2 - t1))
            errors[name] = (out.double() - ref).abs().max().item()
    print(f"{args.precision}, {args.threads} thread(s), best of {args.rounds} interleaved rounds, process CPU s, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    base = sum(best["sdpa + packing mask"])
    print("| attention | forward ms | backward ms | 30 layers s | vs sdpa | max abs diff from fp64 |\n|---|---:|---:|---:|---:|---:|")
    for name, (fw, bw) in best.items():
        print(f"| {name} | {1e3 * fw:.1f} | {1e3 * bw:.1f} | {30 * (fw + bw):.2f} | {(fw + bw) / base:.2f}x | "
              f"{errors[name]:.1e} |")


if __name__ == "__main__":
    main()
