"""`deltatune eval`'s generation through the serving engine against the old path (transformers' generate() on
left-padded batches), on the embedded model with a LoRA adapter and the demo's 50 held-out examples.

    python bench/bench_eval_engine.py                       # trains the demo's LoRA (12 steps) first
    python bench/bench_eval_engine.py --adapter runs/demo/adapter --rounds 3 --precision bf16,fp32
    python bench/bench_eval_engine.py --precision bf16,bf16-stored,fp32 --out eval_engine_stored

Precisions: fp32; bf16 (autocast over the fp32 weights as loaded, what eval_generation gets from a caller);
bf16-stored (autocast after `store_for_bf16_inference`, what `deltatune eval` and `generate` run: the same
logits bit for bit, the base's linear weights and a copy of the tied head stored in bf16, on a second copy of
the model).

Two workloads: "lora", the adapter (answers of 15-25 tokens, ending together), and "base", the same model with
no adapter active (answers in prose, many cut at 64 tokens, some short: rows of a batch end far apart).
Both paths run `deltatune.train.evaluate.eval_generation` with eval's defaults (batch size 16, 64 new tokens,
greedy, exact match), one after the other in the same process, the order alternating every round, so both
meet the same load on a shared machine. Reported per path: wall time and CPU time (time.process_time) of each
round, the best and median, the exact-match score, and whether the two paths wrote the same outputs.
Results in bench/results/eval_engine.json and .md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
import deltatune as dt  # noqa: E402
from deltatune.core.io import load_adapter  # noqa: E402
from deltatune.data import load_records  # noqa: E402
from deltatune.demo import data_path, demo_config  # noqa: E402
from deltatune.models import load_model  # noqa: E402
from deltatune.train.evaluate import eval_generation  # noqa: E402
from deltatune.train.loop import train  # noqa: E402
from deltatune.train.memory import store_for_bf16_inference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {"generate_batch": False, "engine": True}


def trained_adapter(steps: int, out: Path) -> Path:
    """The demo's LoRA (r=16, all linear layers, lr 1e-3, batches of 8) trained for `steps` steps."""
    model, tokenizer = load_model()
    return Path(train(model=model, tokenizer=tokenizer, **demo_config(out, steps)).adapter_dir)


def one_run(model, tokenizer, test, *, engine: bool, bf16: bool, batch_size: int, max_new_tokens: int) -> dict:
    with C.LoadMonitor() as load:
        wall, cpu = time.perf_counter(), time.process_time()
        result = eval_generation(model, tokenizer, test, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 bf16=bf16, engine=engine)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "exact": result["score"], "path": result["path"], "load": load.mean,
            "outputs": [s["output"] for s in result["samples"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (default: train the demo's)")
    p.add_argument("--steps", type=int, default=12, help="training steps when no --adapter is given")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="bf16,fp32", help="comma list of bf16 (autocast), bf16-stored and fp32")
    p.add_argument("--workloads", default="lora,base", help="comma list of lora (the adapter active) and base")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="eval_engine")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(args.adapter) if args.adapter else trained_adapter(args.steps, Path(tmp) / "run")
        model, tokenizer = load_model()
        load_adapter(model, adapter)
        stored = None
        if "bf16-stored" in args.precision.split(","):
            stored, _ = load_model()
            load_adapter(stored, adapter)
            store_for_bf16_inference(stored)
    test = load_records(data_path("test"))
    rows = []
    for workload, precision in [(w, p) for w in args.workloads.split(",") for p in args.precision.split(",")]:
        for m in filter(None, (model, stored)):
            dt.set_active(m, [] if workload == "base" else list(dt.adapters(m)))
        bf16 = precision.startswith("bf16")
        chosen = stored if precision == "bf16-stored" else model
        runs = {name: [] for name in PATHS}
        for r in range(args.rounds):
            order = list(PATHS) if r % 2 == 0 else list(reversed(PATHS))
            for name in order:
                run = one_run(chosen, tokenizer, test, engine=PATHS[name], bf16=bf16, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens)
                assert run["path"] == name, run["path"]
                runs[name].append(run)
                print(f"{workload} {precision} round {r} {name:<15} wall {run['wall_s']:6.1f} s  cpu {run['cpu_s']:6.1f} s  "
                      f"exact {run['exact']:.0%}  other load {run['load']:.1f}", flush=True)
        same = [a == b for a, b in zip(runs["engine"][0]["outputs"], runs["generate_batch"][0]["outputs"])]
        for name, done in runs.items():
            rows.append({
                "workload": workload, "precision": precision, "path": name, "exact": done[0]["exact"],
                "wall_s": [d["wall_s"] for d in done], "cpu_s": [d["cpu_s"] for d in done],
                "load": [d["load"] for d in done], "outputs_equal_to_other_path": sum(same),
                "outputs": done[0]["outputs"],
            })
    meta = {"cpu": C.cpu_name(), "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "examples": len(test),
            "adapter": str(adapter) if args.adapter else f"demo LoRA, {args.steps} steps",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(table(meta, rows))
    print(table(meta, rows))


def table(meta: dict, rows: list[dict]) -> str:
    head = (f"eval_generation on the demo's {meta['examples']} held-out examples, {meta['adapter']}, batch size "
            f"{meta['batch_size']}, {meta['max_new_tokens']} new tokens, greedy, {meta['threads']} thread(s), "
            f"{meta['rounds']} interleaved rounds, {meta['cpu']}, torch {meta['torch']}, {meta['date']}\n\n")
    lines = ["| workload | precision | path | exact match | same outputs | wall best | wall median | CPU best | CPU median "
             "| speed-up over generate_batch (CPU medians) | other load |", "|" + "---|" * 11]
    base = {(r["workload"], r["precision"]): statistics.median(r["cpu_s"]) for r in rows if r["path"] == "generate_batch"}
    for r in rows:
        cpu = statistics.median(r["cpu_s"])
        lines.append(f"| {r['workload']} | {r['precision']} | {r['path']} | {r['exact']:.0%} | {r['outputs_equal_to_other_path']}/"
                     f"{len(r['outputs'])} | {min(r['wall_s']):.1f} s | {statistics.median(r['wall_s']):.1f} s | "
                     f"{min(r['cpu_s']):.1f} s | {cpu:.1f} s | {base[r['workload'], r['precision']] / cpu:.2f}x | "
                     f"{statistics.fmean(r['load']):.1f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
