"""QLoRA's base on the embedded model: footprint, quantization time, dequantize vs matmul per layer, and the
forward + backward time of the base with and without NF4 (the backward reaches the embeddings, as it reaches
adapters). Not a test. Writes bench/results/qlora.json and prints a markdown summary.

    python bench/bench_qlora.py            # ~2 minutes on 2 cores
    python bench/bench_qlora.py --threads 1

The whole training step (QLoRA against 16-bit LoRA and peft + bitsandbytes, batch 4x256) is measured by
bench/bench_qlora_step.py, the quality on the demo task by bench/bench_qlora_quality.py.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deltatune.quant import (
    dequantize_model, footprint, optimizer_memory, quantizable_linears, quantize_model, quantized_layers,
)
from deltatune.quant.optim8bit import lora_shapes

TOKENS = (1, 256)  # forward/backward batch of the base alone (the 4x256 LoRA step: bench_qlora_step.py)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def best_of(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def layer_timings() -> list[dict]:
    """Per 576-wide shape: dequantize alone against the matmul it feeds, 1024 tokens (batch 4x256)."""
    from deltatune.quant import Linear4bit

    rows = []
    for out_f, in_f in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        for dtype in (torch.float32, torch.bfloat16):
            layer = Linear4bit.from_linear(nn.Linear(in_f, out_f, bias=False), compute_dtype=dtype)
            w = layer.dequantize_weight()
            x = torch.randn(1024, in_f, dtype=dtype)
            rows.append(dict(shape=[out_f, in_f], dtype=str(dtype).removeprefix("torch."),
                             dequantize_ms=1e3 * best_of(layer.dequantize_weight, 20),
                             matmul_ms=1e3 * best_of(lambda: x @ w.T, 20),
                             layer_forward_ms=1e3 * best_of(lambda: layer(x), 20)))
    return rows


def step_time(model, ids) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        model(ids).logits.float().square().mean().backward()
    return best_of(step, 2)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    threads = parser.parse_args().threads
    torch.set_num_threads(threads)
    from deltatune.models import load_model

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    result: dict = dict(cpu=cpu, amx_bf16="amx_bf16" in flags, threads=threads, torch=torch.__version__,
                        load_avg=" ".join(f"{x:.1f}" for x in os.getloadavg()))

    model, _ = load_model()
    model.eval()
    gc.collect()
    result["rss_after_fp32_load_mib"] = current_rss_mib()
    planned = footprint(model)
    names = quantizable_linears(model)
    memory = optimizer_memory(model, lora_shapes(model, 16, names))
    ids = torch.randint(0, model.config.vocab_size, TOKENS, generator=torch.Generator().manual_seed(0))

    t = time.perf_counter()
    quantize_model(model, compute_dtype=torch.float32)
    result["quantize_s"] = time.perf_counter() - t
    gc.collect()
    result["rss_after_quantize_mib"] = current_rss_mib()  # before any forward: weights only
    done = footprint(model)
    for p in model.parameters():  # the backward reaches the embeddings, as it reaches adapters
        p.requires_grad_(p is model.get_input_embeddings().weight)
    result["step_nf4_fp32_compute_s"] = step_time(model, ids)
    for _, layer in quantized_layers(model):
        layer.compute_dtype = torch.bfloat16
    result["step_nf4_bf16_compute_s"] = step_time(model.to(torch.bfloat16), ids)
    dequantize_model(model, torch.float32)  # the unquantized baseline: the same model, float linear layers
    model.to(torch.float32)
    result["step_fp32_s"] = step_time(model, ids)
    result["step_bf16_s"] = step_time(model.to(torch.bfloat16), ids)
    result["peak_rss_mib"] = rss_mib()
    result["footprint"] = {k: getattr(done, k) for k in ("layers", "params", "fp32", "bf16", "nf4", "nf4_dq",
                                                         "stored", "other")}
    assert planned.nf4_dq == done.nf4_dq
    result["bits_per_weight_nf4_dq"] = done.bits_per_weight()
    result["optimizer_memory"] = memory.__dict__
    result["layers"] = layer_timings()

    out = Path(__file__).parent / "results" / "qlora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"CPU: {cpu} (AMX-BF16: {result['amx_bf16']}), {threads} threads, torch {torch.__version__}, load "
          f"{result['load_avg']}\n")
    print(done.table(), "\n")
    print(memory.table(), "\n")
    print(f"quantize_model: {result['quantize_s']:.2f} s; RSS {result['rss_after_fp32_load_mib']:.0f} MiB after fp32 "
          f"load -> {result['rss_after_quantize_mib']:.0f} MiB after quantizing")
    print(f"forward+backward {TOKENS[0]}x{TOKENS[1]} tokens: fp32 {result['step_fp32_s']:.2f} s, NF4/fp32 "
          f"{result['step_nf4_fp32_compute_s']:.2f} s, bf16 {result['step_bf16_s']:.2f} s, NF4/bf16 "
          f"{result['step_nf4_bf16_compute_s']:.2f} s\n")
    print("| shape | dtype | dequantize ms | matmul ms (1024 tokens) | Linear4bit forward ms |")
    print("|---|---|---|---|---|")
    for row in result["layers"]:
        print(f"| {row['shape'][0]}x{row['shape'][1]} | {row['dtype']} | {row['dequantize_ms']:.2f} | "
              f"{row['matmul_ms']:.2f} | {row['layer_forward_ms']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
