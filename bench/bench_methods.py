"""Every method on the demo task: held-out exact match against the base model and LoRA, trainable parameters,
adapter file size and step time, each method trained with `deltatune.train` at its own recommended lr.

    python bench/bench_methods.py                       # every method below, ~1-2 min each on 2 cores
    python bench/bench_methods.py --only LORA,IA3 --steps 12

Same data, batch (8), steps, schedule and precision ("auto": bf16 where the CPU has it natively) for every
method; only the adapter section and the learning rate differ. The held-out score is greedy generation on the
50 held-out sentences, exact match, after reloading the saved adapter into a fresh base (as the demo does).
Results: bench/results/methods.json and methods.md (one run, one machine, named in the table).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import cpu_name  # bench/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (adapter section, lr). The lr is each method's recommended one (its config docstring says why).
METHODS: dict[str, tuple[dict, float]] = {
    "LORA": ({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, 1e-3),
    "DORA": ({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "use_dora": True}, 1e-3),
    "IA3": ({"peft_type": "IA3"}, 3e-2),
    "PROMPT_TUNING": ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"}, 3e-2),
    "BOTTLENECK": ({"peft_type": "BOTTLENECK"}, 1e-3),
    "BITFIT": ({"peft_type": "BITFIT"}, 1e-3),
    "FULL": ({"peft_type": "FULL"}, 1e-4),
}


def run_one(name: str, steps: int, out: Path) -> dict:
    from deltatune import load_adapter, trainable_parameters
    from deltatune.demo import _score, data_path, demo_config
    from deltatune.data import load_records as read_records
    from deltatune.models import load_model
    from deltatune.train.loop import train

    adapter, lr = METHODS[name]
    values = demo_config(out, steps)
    values["adapter"] = adapter
    values["optim"] = {**values["optim"], "lr": lr}
    values["log_every"] = steps
    values["data"] = {k: v for k, v in values["data"].items() if k != "eval"}  # step time without evaluation
    model, tokenizer = load_model()
    started = time.perf_counter()
    result = train(model=model, tokenizer=tokenizer, **values)
    train_s = time.perf_counter() - started
    trainable, total = trainable_parameters(model)
    adapter_dir = Path(result.adapter_dir)
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    fresh, tokenizer = load_model()
    load_adapter(fresh, adapter_dir)
    test = read_records(data_path("test"))
    score = _score(fresh, tokenizer, test, None)
    return {"method": name, "lr": lr, "steps": steps, "exact": score["exact"], "json": score["json"],
            "trainable": trainable, "total": total, "file_bytes": size, "train_s": round(train_s, 1),
            "step_s": round(train_s / steps, 2)}


def base_score() -> dict:
    from deltatune.demo import _score, data_path
    from deltatune.data import load_records as read_records
    from deltatune.models import load_model

    model, tokenizer = load_model()
    score = _score(model, tokenizer, read_records(data_path("test")), None)
    return {"method": "base model", "exact": score["exact"], "json": score["json"]}


def table(rows: list[dict], cpu: str) -> str:
    lines = [f"Measured on {cpu}, one run (bench/bench_methods.py).", "",
             "| method | lr | held-out exact | JSON match | trainable params | file size | step time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "lr" not in r:
            lines.append(f"| {r['method']} | — | {r['exact']:.0%} | {r['json']:.0%} | — | — | — |")
            continue
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['exact']:.0%} | {r['json']:.0%} | {r['trainable']:,} "
                     f"({r['trainable'] / r['total']:.3%}) | {r['file_bytes'] / 1e6:.2f} MB | {r['step_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="methods", help="results file stem under bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [base_score()]
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            row = run_one(name, args.steps, Path(tmp) / name)
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(table(rows, cpu_name()))
    print(table(rows, cpu_name()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
