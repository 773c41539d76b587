"""8-bit AdamW states against 32-bit ones on the embedded model: state bytes and the loss curve. Not a test.

    python bench/bench_optim8bit.py                       # full fine-tuning and LoRA r=16, 20 steps each
    python bench/bench_optim8bit.py --steps 40 --methods LORA

The demo task (deltatune/demo.py's data, batch 8, bf16 autocast where the CPU has it natively, seed 0) trained
twice per method, once with torch's AdamW (`optim.name: adamw`) and once with bitsandbytes' AdamW8bit
(`adamw_8bit`), everything else equal: full fine-tuning (`peft_type: FULL`, lr 2e-5, constant after no warm-up)
and LoRA r=16 all-linear (lr 1e-3 cosine, the demo's). Reported: the optimizer-state bytes counted from the
optimizer's own state after the last step, the training loss at every step, the final eval loss on the held-out
set, and peak RSS (a fresh process per run). Results: bench/results/optim8bit.json, optim8bit.md and the
loss curves in optim8bit.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import cpu_name  # bench/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = {
    "FULL": ({"peft_type": "FULL"}, {"lr": 2e-5, "schedule": "constant", "warmup_steps": 0}),
    "LORA": ({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
             {"lr": 1e-3, "schedule": "cosine", "min_lr_ratio": 0.1, "warmup_steps": 0}),
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.numel() > 1)


def run_one(method: str, optim: str, steps: int, threads: int) -> dict:
    """In this (fresh) process: train, and return the losses, state bytes and peak RSS."""
    import resource

    from deltatune.demo import data_path
    from deltatune.train.hooks import Hook
    from deltatune.train.loop import train

    torch.set_num_threads(threads)
    seen: dict[str, int] = {}

    class Measure(Hook):
        def on_step(self, model, optimizer, step):
            seen["state_bytes"] = state_bytes(optimizer)
            seen["trained"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    adapter, lr = ADAPTERS[method]
    with tempfile.TemporaryDirectory() as tmp:
        result = train(adapter=adapter, optim={**lr, "name": optim}, hooks=[Measure()], seed=0, batch_size=8,
                       max_steps=steps, log_every=1, precision="auto", output_dir=str(Path(tmp) / "run"),
                       data={"train": str(data_path("train")), "eval": str(data_path("test")), "max_length": 96})
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "optim": optim, "steps": steps, "losses": [result.losses[s] for s in sorted(result.losses)],
            "eval_loss": result.eval.get("eval_loss"), "peak_rss_mib": round(peak_kib / 1024), **seen}


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured on {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}; demo task, batch 8, "
             f"{meta['steps']} steps, seed 0, bf16 autocast where native.", "",
             "| method | optimizer | trained params | optimizer states | peak RSS | loss, step 1 / mid / last "
             "| max abs diff vs 32-bit, per step | eval loss |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    by = {(r["method"], r["optim"]): r for r in rows}
    for r in rows:
        base = by.get((r["method"], "adamw"))
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"])) if base else float("nan")
        losses = r["losses"]
        lines.append(f"| {r['method']} | {r['optim']} | {r['trained']:,} | {r['state_bytes'] / 2**20:.1f} MiB | "
                     f"{r['peak_rss_mib']} MiB | {losses[0]:.4f} / {losses[len(losses) // 2]:.4f} / {losses[-1]:.4f} | "
                     f"{diff:.4f} | {r['eval_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Training loss per step, 32-bit against 8-bit states, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for r in (r for r in rows if r["method"] == method):
            steps = range(1, len(r["losses"]) + 1)
            ax.plot(steps, r["losses"], marker="o" if r["optim"] == "adamw" else "x", label=r["optim"])
        ax.set(title=method, xlabel="step", ylabel="training loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="FULL,LORA")
    parser.add_argument("--plot-only", action="store_true", help="redraw optim8bit.png from optim8bit.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # METHOD:OPTIM, run in this process (the child)
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "optim8bit.json").read_text())["rows"], RESULTS / "optim8bit.png")
        return
    if args.one:
        method, optim = args.one.split(":")
        print(json.dumps(run_one(method, optim, args.steps, args.threads)))
        return
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    rows = []
    for method in args.methods.split(","):
        for optim in ("adamw", "adamw_8bit"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{method}:{optim}", "--steps", str(args.steps),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optim8bit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "optim8bit.md").write_text(table(rows, meta))
    plot(rows, RESULTS / "optim8bit.png")
    print(table(rows, meta))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
