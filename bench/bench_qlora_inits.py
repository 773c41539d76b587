"""LoRA initialisations and 4-bit bases on the demo task: the quality table of issue 18. Not a test.

    python bench/bench_qlora_inits.py                                   # every run, seed 0, 12 steps
    python bench/bench_qlora_inits.py --steps 40 --seeds 0,1,2 --name qlora_inits_40   # the issue's full table
    python bench/bench_qlora_inits.py --runs lora,qlora,loftq

The demo's budget (deltatune/demo.py: LoRA r=16 alpha=32 all-linear, 8 examples a step, lr 1e-3 cosine to 0.1),
in fp32 (--precision bf16 for autocast), only the init or the base changing; nothing is tuned (no choice is made on the
held-out set, so there is no validation split to carve):

    lora      16-bit base, default init (reference)          qlora     NF4 + DQ base (QLoRA), default init
    loftq     LoftQ, loftq_iter 2 (its base: NF4 of Q_T)     qpissa    PiSSA with an NF4 residual, 2 iterations
    replace   stock NF4 + DQ base, replace_lora_weights_loftq (one SVD of W − dequant(Q))
    gguf      the GGUF file's Q4_1 blocks as the base, default init (equal to lora, the same numbers)
    pissa, olora, eva   16-bit starts (EVA: the loop's pre-pass over the first 64 training examples)

Scores on the 50 held-out sentences after reloading the saved adapter into a fresh base of the kind its file
records (LoftQ/QPiSSA: the full-precision base, Q_T rebuilt from the file): greedy exact match, JSON match, and
the eval loss (teacher-forced, per answer token, from the training run's final evaluation). Recovery =
(L_QLoRA − L_init) / (L_QLoRA − L_LoRA) on the eval loss, per seed then averaged.
Results: bench/results/<name>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import cpu_name  # bench/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = ("lora", "qlora", "gguf", "replace", "loftq", "qpissa", "pissa", "olora", "eva")  # most wanted first
ITERS = 2  # LoftQ's and QPiSSA's iterations (the QPiSSA authors use 5; 2 here: each costs ~50 s of SVDs on these cores)


def adapter_for(run: str) -> tuple[dict, str | None]:
    """(adapter keys over the demo's, the base quantization the loop loads)."""
    extra = {"loftq": {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": ITERS}},
             "qpissa": {"init_lora_weights": "pissa", "loftq_config": {"loftq_bits": 4, "loftq_iter": ITERS}},
             "pissa": {"init_lora_weights": "pissa"}, "olora": {"init_lora_weights": "olora"},
             "eva": {"init_lora_weights": "eva"}}.get(run, {})
    return extra, {"qlora": "nf4", "replace": "nf4", "gguf": "gguf"}.get(run)


def replace_start(out: Path, adapter: dict) -> Path:
    """The replace form's starting adapter, written where train(init_adapter=...) continues it."""
    import deltatune as dt
    from deltatune.models import load_model

    model, _ = load_model(quantize="nf4")
    dt.attach(model, dt.LoraConfig(**{k: v for k, v in adapter.items() if k != "peft_type"}))
    dt.replace_lora_weights_loftq(model)
    return dt.save_adapter(model, out / "replace_start")


def run_one(run: str, seed: int, steps: int, out: Path, precision: str = "fp32") -> dict:
    from deltatune import load_adapter
    from deltatune.commands import quantize_for, recorded_base_quantization
    from deltatune.data import load_records
    from deltatune.demo import MAX_NEW_TOKENS, data_path, demo_config
    from deltatune.train.evaluate import eval_generation, is_match
    from deltatune.models import load_model
    from deltatune.train.loop import train

    extra, quantize = adapter_for(run)
    values = {**demo_config(out / "run", steps), "seed": seed, "quantize": quantize, "log_every": steps,
              "precision": precision}
    values["adapter"] = {**values["adapter"], **extra}
    started = time.perf_counter()
    if run == "replace":
        torch.manual_seed(seed)
        values["init_adapter"] = str(replace_start(out, values["adapter"]))
    result = train(**values)
    train_s = time.perf_counter() - started
    recorded = recorded_base_quantization(result.adapter_dir)
    compute = torch.float32 if precision == "fp32" else torch.bfloat16  # of 4-bit layers, as the loop trained them
    fresh, tokenizer = load_model(quantize=quantize_for(recorded), compute_dtype=compute)
    load_adapter(fresh, result.adapter_dir)
    test = load_records(data_path("test"))
    gen = eval_generation(fresh, tokenizer, test, max_new_tokens=MAX_NEW_TOKENS, match="exact", batch_size=len(test),
                          bf16=precision == "bf16")
    json_match = sum(is_match(s["output"], s["reference"], "json") for s in gen["samples"]) / len(gen["samples"])
    return {"run": run, "seed": seed, "steps": steps, "base_recorded": recorded or "16-bit",
            "train_loss": result.last_loss, "eval_loss": result.eval["eval_loss"], "exact": gen["score"],
            "json": json_match, "train_s": round(train_s, 1)}


def table(rows: list[dict], meta: dict) -> str:
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    loss = {(r["run"], r["seed"]): r["eval_loss"] for r in rows}
    lines = [f"Measured on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; demo task, {meta['steps']} "
             f"steps of 8, LoRA r=16 alpha=32 all-linear, lr 1e-3, {meta.get('precision', 'fp32')}, LoftQ/QPiSSA "
             f"{ITERS} iterations; seeds "
             f"{meta['seeds']}. 1-min load average {meta['load_start']} at the start, {meta['load_end']} at the end "
             "(2 shared cores).", "",
             "| run | base (as the file records) | held-out exact | JSON match | eval loss | recovery | train s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run, rs in by_run.items():
        rec = []
        for r in rs:
            q, lo = loss.get(("qlora", r["seed"])), loss.get(("lora", r["seed"]))
            if q is not None and lo is not None and q != lo:
                rec.append((q - r["eval_loss"]) / (q - lo))
        exact = statistics.fmean(r["exact"] for r in rs)
        seeds = ", ".join(f"{r['exact']:.0%}" for r in rs)
        lines.append(f"| {run} | {rs[0]['base_recorded']} | {exact:.1%} ({seeds}) "
                     f"| {statistics.fmean(r['json'] for r in rs):.1%} | "
                     f"{statistics.fmean(r['eval_loss'] for r in rs):.4f} | "
                     f"{format(statistics.fmean(rec), '+.0%') if rec else '—'} | "
                     f"{statistics.fmean(r['train_s'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 by default: this AMD EPYC (AVX512-BF16, no AMX) ran the bf16 step 2-4x slower")
    parser.add_argument("--name", default="qlora_inits", help="results file stem in bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds, runs = [int(s) for s in args.seeds.split(",")], args.runs.split(",")
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
            "precision": args.precision,
            "seeds": seeds, "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    rows = []
    for seed in seeds:
        for run in runs:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row = run_one(run, seed, args.steps, Path(tmp), args.precision)
                except Exception as exc:  # one failed run does not lose the others
                    print(f"{run} seed {seed} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    continue
            row["load"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
            meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
            RESULTS.mkdir(exist_ok=True)  # written after every run: a cut-off run keeps what it measured
            (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
            (RESULTS / f"{args.name}.md").write_text(table(rows, meta))
    print(table(rows, meta))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
