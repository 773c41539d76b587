"""Prefix caching on the demo's prompts (a shared system prompt), with and without, in the same process:

- `deltatune eval`'s generation (eval_generation through the engine: 50 held-out prompts, batch 16, 64 new
  tokens, greedy), CPU and wall time, and whether the outputs are the same;
- serving, one request at a time (time to first token of each prompt alone, the cache warm from the ones
  before), and all 50 arriving at once (batch 16, 64 new tokens: mean time to first token, tokens per second).

The embedded SmolLM2-135M-Instruct with no adapter, stored for bf16 inference (what `deltatune eval` runs
here: store_for_bf16_inference, bf16 autocast). Cache on/off alternate every round.

    flock /tmp/deltatune-bench.lock python bench/bench_serve_prefix.py --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from deltatune.data import load_records  # noqa: E402
from deltatune.demo import data_path  # noqa: E402
from deltatune.models import load_model  # noqa: E402
from deltatune.serve import Engine, SamplingParams  # noqa: E402
from deltatune.serve import engine as engine_module  # noqa: E402
from deltatune.train.evaluate import _prompt_ids, eval_generation, prompt_and_reference  # noqa: E402
from deltatune.train.memory import store_for_bf16_inference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BYTES = engine_module.Engine.__init__.__kwdefaults__["prefix_cache_bytes"]


def cache(on: bool) -> None:
    """Turn prefix caching on or off for every Engine built from now on (eval builds its own)."""
    engine_module.Engine.__init__.__kwdefaults__["prefix_cache_bytes"] = DEFAULT_BYTES if on else 0


def shared_prefix(prompts: list[list[int]]) -> int:
    n = 0
    while all(len(p) > n and p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def one_at_a_time(model, tokenizer, prompts) -> dict:
    engine = Engine(model, tokenizer, autocast=torch.bfloat16)
    ttft = []
    for ids in prompts:
        start = time.perf_counter()
        request = engine.add_request(ids, None, SamplingParams(max_new_tokens=1))
        while not request.finished:
            engine.step()
        ttft.append(time.perf_counter() - start)
    return {"ttft_median_s": statistics.median(ttft[1:]), "hit_tokens": engine.prefix_cache.hits if engine.prefix_cache
            else 0}


def all_at_once(model, tokenizer, prompts, max_new_tokens: int) -> dict:
    engine = Engine(model, tokenizer, max_batch_size=16, autocast=torch.bfloat16)
    start = time.perf_counter()
    requests = [engine.add_request(ids, None, SamplingParams(max_new_tokens=max_new_tokens)) for ids in prompts]
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for r in requests)
    return {"wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_mean_s": statistics.mean(r.first_token_at - r.arrival for r in requests),
            "outputs": [r.output_ids for r in requests]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="serve_prefix")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    store_for_bf16_inference(model)
    test = load_records(data_path("test"))
    prompts = [_prompt_ids(tokenizer, prompt_and_reference(r, "")[0]) for r in test]
    shared = shared_prefix(prompts)
    print(f"{len(prompts)} prompts, {statistics.mean(map(len, prompts)):.1f} tokens on average, {shared} shared", flush=True)
    runs: dict[str, dict[str, list]] = {"off": {}, "on": {}}
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            cache(mode == "on")
            with C.LoadMonitor() as load:
                wall, cpu = time.perf_counter(), time.process_time()
                result = eval_generation(model, tokenizer, test, bf16=True)
                row = {"eval_wall_s": time.perf_counter() - wall, "eval_cpu_s": time.process_time() - cpu,
                       "eval_outputs": [s["output"] for s in result["samples"]], "eval_exact": result["score"]}
                row.update(one_at_a_time(model, tokenizer, prompts[:20]))
                row.update(all_at_once(model, tokenizer, prompts, 64))
            row["load"], row["uptime"] = load.mean, os.getloadavg()[0]
            for key, value in row.items():
                runs[mode].setdefault(key, []).append(value)
            print(f"round {r} cache {mode:<3} eval wall {row['eval_wall_s']:5.1f} s cpu {row['eval_cpu_s']:5.1f} s | "
                  f"alone TTFT {row['ttft_median_s'] * 1000:5.1f} ms | 50 at once {row['tokens_per_s']:5.1f} tok/s, "
                  f"TTFT {row['ttft_mean_s']:.2f} s | other load {row['load']:.1f}, loadavg {row['uptime']:.2f}", flush=True)
    cache(True)
    same_eval = runs["on"]["eval_outputs"][0] == runs["off"]["eval_outputs"][0]
    same_serve = runs["on"]["outputs"][0] == runs["off"]["outputs"][0]
    med = {m: {k: statistics.median(v) for k, v in runs[m].items() if isinstance(v[0], (int, float))} for m in runs}
    meta = {"cpu": C.cpu_name(), "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
            "prompts": len(prompts), "mean_prompt_tokens": statistics.mean(map(len, prompts)), "shared_tokens": shared,
            "cache_bytes": DEFAULT_BYTES, "same_eval_outputs": same_eval, "same_serve_outputs": same_serve,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [f"# Prefix caching ({meta['cpu']}, torch {meta['torch']}, {args.threads} thread, {args.rounds} rounds, "
             f"medians; {len(prompts)} demo prompts of {meta['mean_prompt_tokens']:.1f} tokens, {shared} shared)", "",
             "| measure | cache off | cache on | ratio |", "|---|---|---|---|"]
    for key, label in (("eval_cpu_s", "deltatune eval generation, CPU s"), ("eval_wall_s", "deltatune eval generation, wall s"),
                       ("ttft_median_s", "serve, one at a time: TTFT s"), ("ttft_mean_s", "serve, 50 at once: mean TTFT s"),
                       ("tokens_per_s", "serve, 50 at once: tokens/s")):
        lines.append(f"| {label} | {med['off'][key]:.3f} | {med['on'][key]:.3f} | {med['on'][key] / med['off'][key]:.2f}x |")
    lines += ["", f"Same eval outputs: {same_eval}; same serving tokens: {same_serve}; other load (mean runnable tasks) "
              f"{med['off']['load']:.1f} / {med['on']['load']:.1f}; prompt tokens reused one at a time: "
              f"{med['on']['hit_tokens']:.0f}."]
    RESULTS.mkdir(exist_ok=True)
    for m in runs:
        runs[m].pop("eval_outputs"), runs[m].pop("outputs")
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
