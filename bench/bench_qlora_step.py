"""The QLoRA training step on the embedded SmolLM2-135M: deltatune's QLoRA against its 16-bit LoRA and against
peft + bitsandbytes' QLoRA, time and memory. Not a test.

    python bench/bench_qlora_step.py                    # 3 configurations x 2 interleaved rounds, ~10 min on 2 cores
    python bench/bench_qlora_step.py --one qlora        # one configuration here; prints a RESULT json line

Batch 4x256 random token ids (labels = the ids), LoRA r=16 alpha=32 all-linear, bf16 autocast (this CPU has
AMX-BF16), `torch.set_num_threads(2)`, each configuration in a fresh process, `--rounds` interleaved passes:

    lora        deltatune's training step as `deltatune train` runs it: fp32 model, frozen linear weights stored
                in bf16 (frozen_bf16), chunked fused loss, fused AdamW
    lora-fp32   the same with the frozen linear weights kept in fp32 (frozen_bf16: false)
    qlora       the same step on `load_model(quantize="nf4")`: linear layers in NF4 + double quantization
                (deltatune.quant.Linear4bit, compute dtype bf16), the head and norms fp32
    gguf        the same step on `load_model(quantize="gguf")`: linear layers in the GGUF file's own Q4_1 blocks
                (deltatune.quant.gguf.LinearQ4_1, compute dtype bf16; weights equal to the lora row's)
    peft-bnb    transformers + bitsandbytes 4-bit (nf4, double quant, bf16 compute) + peft LoRA, as its
                documentation has it: prepare_model_for_kbit_training (no gradient checkpointing),
                model(ids, labels=ids).loss, torch's AdamW

Step time: median of `--steps` steps after `--warmup`. Memory: peak RSS of the process (ru_maxrss, loading
included), RSS once the model is ready (after loading, quantizing, attaching), and their difference (what training
adds: activations, gradients, optimizer states, temporaries). For deltatune's QLoRA, `--breakdown` instrumented
steps also time every dequantization (forward and backward), to see whether it is the bottleneck.
Results: bench/results/qlora_step.json and qlora_step.md (one run, one machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import cpu_name  # bench/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ = 4, 256
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")
CONFIGS = ("lora", "lora-fp32", "qlora", "gguf", "peft-bnb")
RESULT_PREFIX = "RESULT "


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(name: str):
    """(model with LoRA, the HF causal-LM module under it, optimizer, step kind)."""
    from deltatune.models import load_model, resolve_model_path

    if name == "peft-bnb":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), quantization_config=quant,
                                                  dtype=torch.float32, device_map="cpu")
        hf = prepare_model_for_kbit_training(hf, use_gradient_checkpointing=False)
        model = get_peft_model(hf, LoraConfig(**LORA))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, hf, optimizer, "hf"
    import deltatune as dt
    from deltatune.train.config import OptimConfig
    from deltatune.train.memory import copy_out_of_file_mappings, store_frozen_linears_in_bf16
    from deltatune.train.optim import build_optimizer

    quantize = {"qlora": "nf4", "gguf": "gguf"}.get(name)
    model, _ = load_model(quantize=quantize, compute_dtype=torch.bfloat16)
    dt.attach(model, dt.LoraConfig(**LORA))
    if name != "lora-fp32":  # lora-fp32: the frozen weights stay fp32 (frozen_bf16: false), still bf16 autocast
        store_frozen_linears_in_bf16(model)  # what the loop does under bf16 autocast (4-bit layers are left alone)
    copy_out_of_file_mappings(model)
    return model, model, build_optimizer(model, OptimConfig(lr=1e-4)), "chunked"


def make_step(model, hf, optimizer, kind: str, ids: torch.Tensor):
    from deltatune.train.loss import causal_lm_loss

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "hf":
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                total, tokens = causal_lm_loss(hf, batch, 0)
                loss = total / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def dequantize_share(step, name: str) -> dict[str, float]:
    """One step with every 4-bit dequantization (NF4, or Q4_1 for gguf) timed: (step s, dequantize s, count)."""
    from deltatune.quant import Linear4bit
    from deltatune.quant.gguf import LinearQ4_1

    layer_class = LinearQ4_1 if name == "gguf" else Linear4bit
    original = layer_class.dequantize_weight
    spent = [0.0, 0]

    def timed(self):
        start = time.perf_counter()
        out = original(self)
        spent[0] += time.perf_counter() - start
        spent[1] += 1
        return out

    layer_class.dequantize_weight = timed
    try:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    finally:
        layer_class.dequantize_weight = original
    return {"step_s": total, "dequantize_s": spent[0], "dequantizations": spent[1]}


def run_one(name: str, args) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    model, hf, optimizer, kind = build(name)
    load_s = time.perf_counter() - start
    model.train()
    ready = rss_mib()
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    step = make_step(model, hf, optimizer, kind, ids)
    losses = [step() for _ in range(args.warmup)]
    times, cpu, faults = [], [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        losses.append(step())
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    peak = peak_rss_mib()  # before the instrumented steps
    parts = [dequantize_share(step, name) for _ in range(args.breakdown)] if name in ("qlora", "gguf") else []
    return {"config": name, "load_s": load_s, "rss_ready_mib": ready, "peak_rss_mib": peak,
            "training_mib": peak - ready, "times": times, "median_s": statistics.median(times), "cpu_times": cpu,
            "cpu_s": statistics.median(cpu), "minor_faults": statistics.median(faults), "losses": losses,
            "dequantize": min(parts, key=lambda p: p["step_s"]) if parts else None,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--breakdown", str(args.breakdown), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "load_avg": [before, os.getloadavg()[0]]}
    return {"config": name, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}


def markdown(best: dict[str, dict], runs: dict[str, list[dict]], meta: dict) -> str:
    lora = best.get("lora", {})
    lines = [
        f"Measured on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, bitsandbytes {meta['bnb']}, "
        f"peft {meta['peft']}; {meta['rounds']} interleaved rounds, a fresh process per configuration and round; "
        f"step = median of {meta['steps']} steps after {meta['warmup']} warm-up, best round shown (every round's "
        f"median in brackets). 1-min load average {meta['load_start']} at the start, {meta['load_end']} at the "
        "end, on 2 cores shared with other jobs: take the ratios, not the absolute times. Memory: the lowest of "
        "the rounds (it hardly varies).",
        "",
        "step s = wall-clock seconds; cpu s = process CPU seconds per step (less sensitive to other jobs than the "
        "wall time, with one thread nearly the work done); ratios against deltatune's 16-bit LoRA.",
        "",
        "| config | step s (rounds) | cpu s (rounds) | vs LoRA, step / cpu | peak RSS MiB | RSS ready MiB | "
        "peak − ready MiB | loss, first step |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in best.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | |")
            continue
        ok = [x for x in runs[name] if "median_s" in x]
        rounds = ", ".join(f"{x['median_s']:.2f}" for x in ok)
        cpu_rounds = ", ".join(f"{x['cpu_s']:.2f}" for x in ok)
        cpu = min(x["cpu_s"] for x in ok)
        lora_cpu = min((x["cpu_s"] for x in runs.get("lora", []) if "cpu_s" in x), default=None)
        ratio = f"{r['median_s'] / lora['median_s']:.2f}x / {cpu / lora_cpu:.2f}x" if lora_cpu else "—"
        lines.append(f"| {name} | {r['median_s']:.2f} ({rounds}) | {cpu:.2f} ({cpu_rounds}) | {ratio} | "
                     f"{min(x['peak_rss_mib'] for x in ok):.0f} | {min(x['rss_ready_mib'] for x in ok):.0f} | "
                     f"{min(x['training_mib'] for x in ok):.0f} | {r['losses'][0]:.4f} |")
    for name in ("qlora", "gguf"):
        d = best.get(name, {}).get("dequantize")
        if d:
            share = d["dequantize_s"] / d["step_s"]
            lines += ["", f"deltatune {name}, one instrumented step: {d['dequantizations']} dequantizations took "
                          f"{d['dequantize_s']:.2f} s of a {d['step_s']:.2f} s step ({share:.0%})."]
    return "\n".join(lines) + "\n"


def drive(args) -> None:
    import bitsandbytes
    import peft

    configs = args.only.split(",") if args.only else list(CONFIGS)
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "bnb": bitsandbytes.__version__,
            "peft": peft.__version__, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
            "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for name in configs:
            res = spawn(name, args)
            runs[name].append(res)
            shown = res.get("error") or (f"median {res['median_s']:.2f} s, peak {res['peak_rss_mib']:.0f} MiB, "
                                         f"ready {res['rss_ready_mib']:.0f} MiB")
            print(f"[round {round_ + 1}] {name}: {shown} (load {os.getloadavg()[0]:.1f})", flush=True)
            if "error" in res:
                print(res["stderr_tail"], file=sys.stderr)
    meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    best = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        best[name] = min(ok, key=lambda r: r["median_s"]) if ok else rs[-1]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    table = markdown(best, runs, meta)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", choices=CONFIGS, help="run one configuration here and print a RESULT json line")
    parser.add_argument("--only", help=f"comma-separated configurations (default: {','.join(CONFIGS)})")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--breakdown", type=int, default=2, help="instrumented QLoRA steps (dequantization timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="qlora_step", help="results file stem under bench/results")
    parser.add_argument("--table", action="store_true", help="rewrite the markdown table from the saved json")
    args = parser.parse_args()
    if args.table:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        runs = saved["runs"]
        best = {n: min((r for r in rs if "error" not in r), key=lambda r: r["median_s"], default=rs[-1])
                for n, rs in runs.items()}
        (RESULTS / f"{args.name}.md").write_text(markdown(best, runs, saved["meta"]))
        print(markdown(best, runs, saved["meta"]))
    elif args.one:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps(run_one(args.one, args)), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
