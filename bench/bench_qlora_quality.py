"""QLoRA's quality against 16-bit LoRA on the built-in demo task, over seeds. Not a test.

    python bench/bench_qlora_quality.py                 # 2 bases x 3 seeds, ~15 min on 2 busy cores
    python bench/bench_qlora_quality.py --seeds 0,1 --steps 12
    python bench/bench_qlora_quality.py --steps 40 --name qlora_quality_40   # one epoch of the demo data

The demo's training budget for both (deltatune/demo.py: LoRA r=16 alpha=32 all-linear, 12 steps of 8 examples,
lr 1e-3 cosine to 0.1, bf16 autocast where the CPU has it natively): once on the embedded SmolLM2-135M as
loaded (fp32 weights; the loop stores the frozen linear weights in bf16 under bf16 autocast), once on the same
model loaded with `quantize="nf4"` (QLoRA: NF4 + double quantization, compute dtype bf16). Only the seed changes
between runs of a base (LoRA's A init and the data order). Scores, on the 50 held-out sentences after reloading
the saved adapter into a fresh base of the kind it was trained on (as the demo does): greedy exact match and
JSON match, and the eval loss (teacher-forced loss per answer token, from the training run's final evaluation).
The QLoRA adapters are also scored on the 16-bit base (the file loads onto either).
Results: bench/results/qlora_quality.json and qlora_quality.md.
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


def run_one(quantize: str | None, seed: int, steps: int, out: Path) -> dict:
    from deltatune import load_adapter
    from deltatune.data import load_records
    from deltatune.demo import _score, data_path, demo_config
    from deltatune.models import load_model
    from deltatune.train.loop import train

    values = {**demo_config(out, steps), "seed": seed, "quantize": quantize, "log_every": steps}
    started = time.perf_counter()
    result = train(**values)
    train_s = time.perf_counter() - started
    test = load_records(data_path("test"))
    row = {"base": "NF4 (QLoRA)" if quantize else "16-bit (LoRA)", "seed": seed, "steps": steps,
           "train_loss": result.last_loss, "eval_loss": result.eval["eval_loss"], "train_s": round(train_s, 1)}
    fresh, tokenizer = load_model(quantize=quantize)
    load_adapter(fresh, result.adapter_dir)
    score = _score(fresh, tokenizer, test, None)
    row.update(exact=score["exact"], json=score["json"])
    if quantize:  # the same adapter file on the full-precision base
        plain, tokenizer = load_model()
        load_adapter(plain, result.adapter_dir)
        score = _score(plain, tokenizer, test, test_examples(tokenizer))
        row.update(exact_on_16bit=score["exact"], json_on_16bit=score["json"], eval_loss_on_16bit=score["loss"])
    return row


def test_examples(tokenizer) -> list:
    """The held-out set tokenized as the demo does (the training loop's eval split is the same file)."""
    from deltatune.data import load_records, tokenize
    from deltatune.demo import data_path

    examples, _ = tokenize(load_records(data_path("test")), tokenizer, format="messages", max_length=96,
                           source="demo test set")
    return list(examples)


def score_base(quantize: str | None) -> dict:
    """The untrained base, as loaded for training: how much the 4-bit base alone moves the scores."""
    from deltatune.data import load_records
    from deltatune.demo import _score, data_path
    from deltatune.models import load_model

    model, tokenizer = load_model(quantize=quantize)
    score = _score(model, tokenizer, load_records(data_path("test")), test_examples(tokenizer))
    return {"base": "NF4 base" if quantize else "16-bit base", "exact": score["exact"], "json": score["json"],
            "eval_loss": score["loss"]}


def summary(rows: list[dict], base: str) -> dict:
    mine = [r for r in rows if r["base"] == base]
    out = {"base": base, "n": len(mine)}
    for key in ("exact", "json", "eval_loss", "exact_on_16bit", "eval_loss_on_16bit"):
        values = [r[key] for r in mine if key in r]
        if values:
            out[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return out


def table(rows: list[dict], meta: dict) -> str:
    lora, qlora = summary(rows, "16-bit (LoRA)"), summary(rows, "NF4 (QLoRA)")
    lines = [f"Measured on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; demo task, {meta['steps']} "
             f"steps of 8, LoRA r=16 all-linear, lr 1e-3; seeds {meta['seeds']}. 1-min load average "
             f"{meta['load_start']} at the start, {meta['load_end']} at the end (2 shared cores; times are noisy).", "",
             "| base | seed | held-out exact | JSON match | eval loss | train loss (last step) "
             "| adapter on the 16-bit base: exact, eval loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in meta.get("bases", []):
        lines.append(f"| {r['base']}, untrained | — | {r['exact']:.0%} | {r['json']:.0%} | {r['eval_loss']:.4f} "
                     "| — | — |")
    for r in rows:
        on16 = f"{r['exact_on_16bit']:.0%}, loss {r['eval_loss_on_16bit']:.4f}" if "exact_on_16bit" in r else "—"
        lines.append(f"| {r['base']} | {r['seed']} | {r['exact']:.0%} | {r['json']:.0%} | {r['eval_loss']:.4f} | "
                     f"{r['train_loss']:.4f} | {on16} |")
    lines += ["", "| base | mean exact (min–max) | mean JSON | mean eval loss (min–max) |", "|---|---:|---:|---:|"]
    for s in (lora, qlora):
        if "exact" in s:
            lines.append(f"| {s['base']} | {s['exact']['mean']:.1%} ({s['exact']['min']:.0%}–"
                         f"{s['exact']['max']:.0%}) | {s['json']['mean']:.1%} | {s['eval_loss']['mean']:.4f} "
                         f"({s['eval_loss']['min']:.4f}–"
                         f"{s['eval_loss']['max']:.4f}) |")
    if "exact" in lora and "exact" in qlora:
        e, q = lora["exact"], qlora["exact"]
        inside = e["min"] <= q["mean"] <= e["max"] or abs(q["mean"] - e["mean"]) <= 0.03
        loss = qlora["eval_loss"]["mean"] / lora["eval_loss"]["mean"] - 1
        lines += ["", f"QLoRA's mean exact match {q['mean']:.1%} against LoRA's {e['mean']:.1%} (seed range "
                      f"{e['min']:.0%}–{e['max']:.0%}): {'within' if inside else 'outside'} the range or 3 points; "
                      f"eval loss {loss:+.1%} ({'within' if abs(loss) <= 0.05 else 'outside'} 5%)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="qlora_quality", help="results file stem in bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
            "seeds": seeds, "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    meta["bases"] = [score_base(None), score_base("nf4")]
    print(json.dumps(meta["bases"]), flush=True)
    rows = []
    for seed in seeds:  # the two bases interleaved, so load on the machine hits both alike
        for quantize in (None, "nf4"):
            with tempfile.TemporaryDirectory() as tmp:
                row = run_one(quantize, seed, args.steps, Path(tmp) / "run")
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(table(rows, meta))
    print(table(rows, meta))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
