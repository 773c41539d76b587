#!/usr/bin/env python3
"""LoRAHub on the task family (scripts/make_task_family.py), the embedded SmolLM2-135M-Instruct.

Five task LoRAs (person, order, contact, person_csv, event; r=16 all-linear, `--steps` steps of 8 from
examples/sft.yaml's recipe) are composed for the new task `booking` (names and cities as person, a count as
order, a date as event), with weights searched on its 20 few-shot examples only. Held-out exact match on
booking.test (50) for: the base, each single adapter, two uniform averages (cat with wᵢ = 1/K: the mean of
the ΔWᵢ; lorahub with wᵢ = 1/K: the mean of the factors), LoRAHub per search seed and candidate subset, and a
LoRA trained on the same 20 examples. Nothing here was tuned on booking.test: LoRAHub runs with the
paper's settings (budget 40, λ = 0.05, bounds ±1.5), the few-shot LoRA with the demo's recipe.

    flock /tmp/deltatune-bench.lock python3 bench/bench_lorahub.py --out bench/results/lorahub.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
TASKS = ["person", "order", "contact", "person_csv", "event"]
DATA = ROOT / "deltatune" / "demo_data" / "tasks"
SUBSETS = {"all 5": TASKS, "person+order+event": ["person", "order", "event"]}


def _train(task_file: Path, eval_file: Path, out: Path, steps: int, batch_size: int = 8) -> Path:
    from deltatune.train.loop import train

    if (out / "adapter" / "adapter_model.safetensors").is_file():
        return out / "adapter"
    result = train(str(ROOT / "examples" / "sft.yaml"), overrides=[
        "--data.train", str(task_file), "--data.eval", str(eval_file), "--max_steps", str(steps),
        "--batch_size", str(batch_size), "--output_dir", str(out), "--log_every", "100"])
    return Path(result.adapter_dir)


def _score(model, tokenizer, records, bf16: bool) -> float:
    from deltatune.train.evaluate import eval_generation

    return eval_generation(model, tokenizer, records, match="exact", max_new_tokens=48, batch_size=16, bf16=bf16)["score"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps of each task LoRA")
    parser.add_argument("--fewshot-steps", type=int, default=20, help="steps (batch 4) of the LoRA on the 20 examples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltatune-lorahub"), help="adapters are kept here")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON (and .md beside it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP barrier spinning on a "
                        "shared, loaded machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import deltatune as dt
    from deltatune.compose import combine_adapters
    from deltatune.compose.lorahub import lorahub
    from deltatune.data import load_records
    from deltatune.models import load_model
    from deltatune.train.evaluate import bf16_available
    from _common import cpu_name

    started = time.time()
    load = lambda: os.getloadavg()[0]  # noqa: E731
    dirs = {t: _train(DATA / f"{t}.train.jsonl", DATA / f"{t}.validation.jsonl", args.work / t, args.steps)
            for t in TASKS}
    dirs["fewshot"] = _train(DATA / "booking.fewshot.jsonl", DATA / "booking.validation.jsonl", args.work / "fewshot",
                             args.fewshot_steps, batch_size=4)
    fewshot = load_records(str(DATA / "booking.fewshot.jsonl"))
    test = load_records(str(DATA / "booking.test.jsonl"))

    model, tokenizer = load_model()
    bf16 = bf16_available(model)
    rows: list[dict] = []

    def record(label: str, kind: str, weights=None, **extra) -> None:
        score = _score(model, tokenizer, test, bf16)
        rows.append({"adapter": label, "kind": kind, "exact": score, "weights": weights, "load": round(load(), 2), **extra})
        print(f"{label:<40} {kind:<18} exact {score:6.1%}  load {load():.2f}", flush=True)

    record("base model", "-")
    for t in [*TASKS, "fewshot"]:
        dt.load_adapter(model, dirs[t], t)
    for t in TASKS:
        dt.set_active(model, t)
        record(t, "single task LoRA")
    dt.set_active(model, "fewshot")
    record("LoRA on the 20 few-shot examples", f"{args.fewshot_steps} steps x 4")
    uniform = [1 / len(TASKS)] * len(TASKS)
    for kind in ("cat", "lorahub"):
        combine_adapters(model, TASKS, uniform, f"uniform_{kind}", combination_type=kind, activate=True)
        record(f"uniform average ({kind}, w=1/5)", kind, uniform)
    for subset_name, subset in SUBSETS.items():
        for seed in args.seeds:
            name = f"hub_{len(subset)}_{seed}"
            t0 = time.time()
            result = lorahub(model, subset, fewshot, name, tokenizer=tokenizer, budget=args.budget, seeds=[seed], bf16=bf16)
            search_s = time.time() - t0
            record(f"LoRAHub {subset_name}, seed {seed}", "lorahub", [round(w, 3) for w in result.weights],
                   fewshot_objective=round(result.objective, 4), search_s=round(search_s, 1))
    summary = {"cpu": cpu_name(), "machine": platform.machine(), "threads": torch.get_num_threads(), "bf16": bf16,
               "steps": args.steps, "budget": args.budget, "test": "booking.test (50), exact match",
               "wall_s": round(time.time() - started, 1), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"# LoRAHub on the task family ({summary['cpu']}, {summary['threads']} threads, bf16={bf16})", "",
                 "| adapter | kind | booking.test exact | weights | load |", "|---|---|---:|---|---:|"]
        lines += [f"| {r['adapter']} | {r['kind']} | {r['exact']:.0%} | {r['weights'] or ''} | {r['load']} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
