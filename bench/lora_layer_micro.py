"""Micro-benchmark of one LoRA linear layer: deltatune's forward against candidate rewrites, checked for parity.

    python bench/lora_layer_micro.py            # SmolLM2 shapes (1024 tokens, 576 <-> 1536), 2 threads

Not a deltatune test: it times the LoRA branch of `LoraLinear.adapter_forward` and the mixed-batch `route_rows`
against drop-in alternatives, so a proposed change to deltatune/methods/lora.py or deltatune/core/layer.py comes
with a measured gain. Every candidate is first checked against the current code (allclose).

LoRA branch candidates (h = W0 x is computed by the base layer in all of them):
  current     result + (B(A(x)) * s).to(result.dtype)           scale and add over the (tokens, d_out) output
  scale_r     result + B(A(x) * s)                              scale the (tokens, r) intermediate instead
  addmm       addmm(result, A(x), Bᵀ, alpha=s)                  one BLAS call: GEMM, scale and add fused
Mixed-batch candidates (4 adapters, one row each, no grad):
  current     route_rows: out-of-place index_copy of the whole output per adapter
  inplace     result[rows] += s·B(A(x[rows])), peft's way (allowed when no gradient is recorded)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import deltatune as dt
from deltatune.core.layer import route_rows

TOKENS = 1024  # batch 4 x 256


class One(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)


def lora_layer(d_in: int, d_out: int, names=("a",)):
    torch.manual_seed(0)
    model = One(d_in, d_out)
    for name in names:
        dt.attach(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), name=name,
                  activate=name == names[0])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.01)
    return model.proj


def current(layer, name, x, result):
    return layer.adapter_forward(name, x, result)


def scale_r(layer, name, x, result):
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    return result + lora_B(lora_A(x) * layer.scaling[name])


def addmm(layer, name, x, result):
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    h = lora_A(x)  # (..., r)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.weight.t(),
                      alpha=layer.scaling[name])
    return out.view(result.shape)


def inplace_route(layer, groups, x, result):
    for name, rows in groups.items():
        if name in layer.lora_A:
            result[rows] += addmm(layer, name, x[rows], torch.zeros_like(result[rows]))
    return result


def best_ms(fn, repeat: int) -> float:
    """Median of `repeat` timings in ms after one warmup (median: robust to other processes on the machine)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def branch_cases(repeat: int) -> list[tuple[str, str, str, float]]:
    rows = []
    for d_in, d_out in ((576, 1536), (1536, 576)):
        layer = lora_layer(d_in, d_out)
        for precision in ("fp32", "bf16"):
            # bf16: the input of o_proj / down_proj is already a bf16 autocast output; of the others, fp32.
            x0 = torch.randn(TOKENS, d_in, dtype=torch.bfloat16 if precision == "bf16" and d_in > d_out else None)
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else torch.no_grad
            for mode in ("forward", "train"):
                reference = None
                for variant in (current, scale_r, addmm):
                    x = x0.clone().requires_grad_(mode == "train")

                    def run():
                        with ctx(), torch.set_grad_enabled(mode == "train"):
                            out = variant(layer, "a", x, layer.base_layer(x))
                        if mode == "train":
                            out.float().square().mean().backward()
                        return out

                    out = run().detach().float()
                    if reference is None:
                        reference = out
                    tol = 2e-2 if precision == "bf16" else 1e-5
                    if not torch.allclose(out, reference, rtol=tol, atol=tol):
                        raise AssertionError(f"{variant.__name__} differs from the current code ({precision}, {mode})")
                    rows.append((f"{d_in}->{d_out}", precision, mode, variant.__name__, best_ms(run, repeat)))
    return rows


def route_cases(repeat: int) -> list[tuple[str, str, str, str, float]]:
    names = ("a", "b", "c", "d")
    layer = lora_layer(576, 1536, names)
    x = torch.randn(4, 256, 576)
    groups = {n: torch.tensor([i]) for i, n in enumerate(names)}
    rows = []
    with torch.no_grad():
        expected = route_rows(groups, names, x, layer.base_layer(x), layer.adapter_forward)
        got = inplace_route(layer, groups, x, layer.base_layer(x))
        if not torch.allclose(expected, got, rtol=1e-5, atol=1e-5):
            raise AssertionError("the in-place mixed batch differs from route_rows")
        for variant, fn in (
            ("current", lambda: route_rows(groups, layer.adapter_names, x, layer.base_layer(x), layer.adapter_forward)),
            ("inplace", lambda: inplace_route(layer, groups, x, layer.base_layer(x))),
            ("base only", lambda: layer.base_layer(x)),
        ):
            rows.append(("576->1536", "fp32", "mixed 4 rows", variant, best_ms(fn, repeat)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = branch_cases(args.repeat) + route_cases(args.repeat)
    print(f"\none LoRA linear (r=16), {TOKENS} tokens, {args.threads} threads; ms per call = base layer + LoRA "
          f"branch (+ backward in train mode), median of {args.repeat}; every candidate matches the current code\n")
    print("| layer | precision | mode | variant | ms | vs current |")
    print("|---|---|---|---|---:|---:|")
    current_ms = {}
    for shape, precision, mode, variant, ms in rows:
        key = (shape, precision, mode)
        current_ms.setdefault(key, ms)
        print(f"| {shape} | {precision} | {mode} | {variant} | {ms:.2f} | {ms / current_ms[key]:.2f}x |")


if __name__ == "__main__":
    main()
