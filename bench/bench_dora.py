"""DoRA training step on the embedded SmolLM2-135M: deltatune's DoRA vs its LoRA vs peft's DoRA vs peft's LoRA.

    python bench/bench_dora.py                         # every configuration, 2 interleaved rounds, bf16
    python bench/bench_dora.py --only dt-lora,dt-dora --rounds 1 --steps 2
    python bench/bench_dora.py --one dt-dora            # one configuration here; prints a RESULT json line
    python bench/bench_dora.py --ab hf --steps 6 --threads 1   # our DoRA / our LoRA, interleaved in one process

Batch 4x256 random token ids (labels = the ids), r=16 alpha=32 all-linear, `torch.set_num_threads(2)`, bf16 =
`torch.autocast("cpu", dtype=torch.bfloat16)` (`--precision fp32` for none). The four main rows share one step:
`model(ids, labels=ids).loss`, backward, torch's default AdamW, so only the adapter layers differ. Two more rows
use deltatune's speed mode (the training loop's chunked loss, fused AdamW, bf16 frozen base weights), where
DoRA's norm reads a bf16 base. Every configuration runs in a fresh process (peak RSS and allocator state never
leak between them); `--rounds N` interleaves N passes and keeps each configuration's best median. Peak RSS is
ru_maxrss of the process, model loading included. Results: bench/results/dora.json and dora.md.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from _common import cpu_name  # bench/ is on sys.path when this script runs
from bench_train import best_of, current_rss_gb, load_base

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ = 4, 256
ADAPTER = dict(r=16, lora_alpha=32, target_modules="all-linear")
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Setup:
    what: str
    lib: str  # "peft" or "deltatune"
    dora: bool
    speed: bool = False  # deltatune's speed mode: chunked loss, fused AdamW, bf16 frozen base under bf16


SETUPS = {
    "peft-lora": Setup("peft LoRA", "peft", False),
    "peft-dora": Setup("peft DoRA (use_dora=True)", "peft", True),
    "dt-lora": Setup("deltatune LoRA", "deltatune", False),
    "dt-dora": Setup("deltatune DoRA (use_dora=True)", "deltatune", True),
    "dt-lora-speed": Setup("deltatune LoRA, speed mode", "deltatune", False, speed=True),
    "dt-dora-speed": Setup("deltatune DoRA, speed mode", "deltatune", True, speed=True),
}
RATIO_TO = {"peft-dora": "peft-lora", "dt-dora": "dt-lora", "dt-dora-speed": "dt-lora-speed"}


def build(setup: Setup, precision: str):
    model, loader = load_base()
    info = {"loader": loader, "rss_after_load_gb": current_rss_gb()}
    if setup.lib == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(use_dora=setup.dora, **ADAPTER))
        hf = model.get_base_model()
    else:
        import deltatune as dt

        model = hf = dt.attach(model, dt.LoraConfig(use_dora=setup.dora, **ADAPTER))
    model.train()
    if setup.speed:
        from deltatune.train.config import OptimConfig
        from deltatune.train.memory import copy_out_of_file_mappings, store_frozen_linears_in_bf16
        from deltatune.train.optim import build_optimizer

        if precision == "bf16":
            store_frozen_linears_in_bf16(hf)
            copy_out_of_file_mappings(hf)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, hf, optimizer, info


def run_one(name: str, args) -> dict:
    setup = SETUPS[name]
    torch.manual_seed(0)
    model, hf, optimizer, info = build(setup, args.precision)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if setup.speed:
                from deltatune.train.loss import causal_lm_loss

                total, tokens = causal_lm_loss(hf, batch, 0)
                loss = total / tokens
            else:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(args.warmup)]
    times, cpu = [], []
    for _ in range(args.steps):
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {**info, "setup": asdict(setup), "precision": args.precision, "times": times, "median_s": statistics.median(times),
            "cpu_s": cpu, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "losses": losses, "steps": args.steps, "warmup": args.warmup}


def run_ab(args) -> dict:
    """Our LoRA and DoRA as two adapters of one model in one process, steps alternating (ABBA): the CPU-time ratio
    per pair of neighbouring steps is robust to other load, which slows both alike."""
    import deltatune as dt

    model, _ = load_base()
    for name, dora in (("lora", False), ("dora", True)):
        dt.attach(model, dt.LoraConfig(use_dora=dora, **ADAPTER), name)
    if args.ab == "speed" and args.precision == "bf16":
        from deltatune.train.memory import store_frozen_linears_in_bf16

        store_frozen_linears_in_bf16(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    optimizers = {}
    for name in ("lora", "dora"):
        dt.set_active(model, name)
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(name: str) -> float:
        dt.set_active(model, name)
        start = time.thread_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.thread_time() - start

    for name in ("lora", "dora"):  # warmup
        step(name)
    cpu: dict[str, list[float]] = {"lora": [], "dora": []}
    for i in range(args.steps):
        for name in ("lora", "dora") if i % 2 == 0 else ("dora", "lora"):
            cpu[name].append(step(name))
    ratios = [d / l for l, d in zip(cpu["lora"], cpu["dora"])]
    return {"mode": args.ab, "precision": args.precision, "cpu_s": cpu, "pair_ratios": ratios,
            "median_ratio": statistics.median(ratios), "load_avg": os.getloadavg()}


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "process_wall_s": wall, "load_avg": os.getloadavg()}
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:], "process_wall_s": wall}


def markdown(results: dict, meta: dict) -> str:
    lines = [
        "# DoRA training step: deltatune vs peft",
        "",
        f"SmolLM2-135M, batch {BATCH}x{SEQ}, r=16 alpha=32 all-linear, {meta['precision']}, {meta['threads']} torch "
        f"threads, each configuration in a fresh process, best median of {meta['rounds']} interleaved rounds "
        f"({meta['steps']} timed steps after {meta['warmup']} warmup). cpu s = process CPU seconds per step (less "
        "sensitive to other load); load = 1-minute load average when the row finished (2 cores: above 2 means "
        "other work shared the machine). step s = the best round's median; cpu s = the lowest median over the rounds. "
        "DoRA / LoRA = the DoRA row against the same library's LoRA row.",
        "",
        "| config | step s | cpu s | peak RSS GB | DoRA / LoRA step | DoRA / LoRA cpu | DoRA / LoRA RSS | loss0 | load | what |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        what = SETUPS[name].what
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | {what} |")
            continue
        ref = results.get(RATIO_TO.get(name, ""), {})
        step = f"{r['median_s'] / ref['median_s']:.2f}x" if "median_s" in ref else ""
        cpu = f"{r['best_cpu_s'] / ref['best_cpu_s']:.2f}x" if "best_cpu_s" in ref else ""
        rss = f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if "peak_rss_gb" in ref else ""
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['best_cpu_s']:.2f} | {r['peak_rss_gb']:.2f} | "
                     f"{step} | {cpu} | {rss} | {r['losses'][0]:.4f} | {r['load_avg'][0]:.1f} | {what} |")
    lines += ["", f"Machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, peft {meta['peft']}. "
              f"Load average at start {meta['load_start']}, at end {meta['load_end']}."]
    return "\n".join(lines) + "\n"


def drive(args) -> None:
    import peft

    configs = args.only.split(",") if args.only else list(SETUPS)
    unknown = [c for c in configs if c not in SETUPS]
    if unknown:
        raise SystemExit(f"--only: unknown configurations {unknown}; choose from {', '.join(SETUPS)}")
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "precision": args.precision,
            "torch": torch.__version__, "peft": peft.__version__, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for name in configs:
            res = spawn(name, args)
            runs[name].append(res)
            shown = res.get("error") or f"median {res['median_s']:.3f} s, peak RSS {res['peak_rss_gb']:.2f} GB"
            print(f"[round {round_ + 1}] {name}: {shown} (load {os.getloadavg()[0]:.1f})", flush=True)
            if "error" in res:
                print(res["stderr_tail"], file=sys.stderr)
    results = {}
    for name, r in runs.items():
        results[name] = best_of(r)
        medians = [statistics.median(x["cpu_s"]) for x in r if "cpu_s" in x]
        if medians:
            results[name]["best_cpu_s"] = min(medians)
    meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results, meta)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", choices=list(SETUPS), help="run one configuration here and print a RESULT json line")
    parser.add_argument("--only", help=f"comma-separated configurations (default: all of {', '.join(SETUPS)})")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes over all configurations (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--name", default="dora", help="results file stem under bench/results (default: dora)")
    parser.add_argument("--ab", choices=("hf", "speed"), help="our LoRA vs our DoRA, interleaved in one process "
                        "(hf: fp32 base weights; speed: bf16 frozen base); --steps pairs; prints a RESULT line")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be >= 1")
    if args.ab:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps(run_ab(args)), flush=True)
    elif args.one:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps({"config": args.one, **run_one(args.one, args)}), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
