"""The demo's figure as a spread, not one run: the demo's LoRA run (12 steps x 8, r=16 all-linear, lr 1e-3) with
training seeds 0..N-1, each adapter reloaded into a fresh base and scored on the 50 held-out sentences
(greedy, exact and JSON match), exactly as `deltatune demo` scores it (seed 0 is the demo itself).

    flock /tmp/deltatune-bench.lock python3 bench/bench_demo_spread.py --seeds 5 --out bench/results/demo_spread.json

--set KEY=VALUE changes a training key of the demo's config (dotted for a section, VALUE as JSON), e.g.
`--set data.packing=true --set attention='"per_example"'`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/demo_spread.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training key of the demo's config, dotted for a section, VALUE as JSON")
    args = parser.parse_args()

    from deltatune.core.io import load_adapter
    from deltatune.data import load_records
    from deltatune.demo import DEMO_STEPS, _score, data_path, demo_config
    from deltatune.models import load_model
    from deltatune.threads import apply_threads
    from deltatune.train.evaluate import bf16_available
    from deltatune.train.loop import train
    from deltatune.train.memory import store_for_bf16_inference

    print(apply_threads(0), flush=True)
    test = load_records(data_path("test"))
    runs = []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            model, tokenizer = load_model()
            config = {**demo_config(Path(tmp) / "run", DEMO_STEPS), "seed": seed}
            for item in args.set:
                key, _, value = item.partition("=")
                *sections, last = key.split(".")
                target = config
                for section in sections:
                    target = target.setdefault(section, {})
                target[last] = json.loads(value)
            result = train(model=model, tokenizer=tokenizer, **config)
            fresh, _ = load_model()
            load_adapter(fresh, result.adapter_dir)
            if bf16_available(fresh):
                store_for_bf16_inference(fresh)
            scores = _score(fresh, tokenizer, test, None)
            runs.append({"seed": seed, "exact": scores["exact"], "json": scores["json"],
                         "eval_loss": result.eval["eval_loss"], "seconds": round(time.perf_counter() - start, 1),
                         "load": os.getloadavg()[0]})
            print(json.dumps(runs[-1]), flush=True)
    exact = [r["exact"] for r in runs]
    summary = {"cpu": cpu_name(), "seeds": args.seeds, "set": args.set, "runs": runs,
               "exact_mean": statistics.mean(exact), "exact_min": min(exact), "exact_max": max(exact),
               "exact_stdev": statistics.pstdev(exact), "json_mean": statistics.mean(r["json"] for r in runs),
               "eval_loss_mean": statistics.mean(r["eval_loss"] for r in runs)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"exact match over {args.seeds} seeds: mean {summary['exact_mean']:.0%}, min {min(exact):.0%}, "
          f"max {max(exact):.0%} ({summary['cpu']}; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
