"""Chunked prefill: time per output token of running requests while a 2k-token prompt arrives, with and without.

8 requests decode (64 tokens each, end-of-sequence ignored) on the embedded SmolLM2-135M-Instruct (fp32 or
bf16 weights, as `deltatune serve` loads them); after 8 steps a 2,048-token prompt arrives. Each engine step's
wall time is one output token for every running request: reported are the median and p99 (the worst, with
this few steps) of those steps, and the long prompt's time to first token. prefill_chunk None (whole prompts)
against 256 and 512, alternating every round, in one process.

    flock /tmp/deltatune-bench.lock python bench/bench_serve_chunked.py --rounds 2
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
from deltatune.models import load_model  # noqa: E402
from deltatune.serve import Engine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(model, chunk: int | None, long_tokens: int, steps_before: int = 8) -> dict:
    engine = Engine(model, None, prefill_chunk=chunk, prefix_cache_bytes=0)
    g = torch.Generator().manual_seed(0)
    short = [torch.randint(100, 20000, (40,), generator=g).tolist() for _ in range(8)]
    running = [engine.add_request(p, None, SamplingParams(max_new_tokens=64, ignore_eos=True)) for p in short]
    step_times, long = [], None
    for step in range(200):
        if step == steps_before:
            prompt = torch.randint(100, 20000, (long_tokens,), generator=g).tolist()
            long = engine.add_request(prompt, None, SamplingParams(max_new_tokens=4, ignore_eos=True))
        before = [len(r.output_ids) for r in running]
        start = time.perf_counter()
        engine.step()
        took = time.perf_counter() - start
        if step >= steps_before and any(len(r.output_ids) > b for r, b in zip(running, before)):
            step_times.append(took)  # a step in which the running requests got a token, the long prompt present
        if long is not None and long.finished and all(r.finished for r in running):
            break
    return {"tpot_median_s": statistics.median(step_times), "tpot_p99_s": sorted(step_times)[
        min(len(step_times) - 1, int(0.99 * len(step_times)))], "long_ttft_s": long.first_token_at - long.arrival,
        "steps": len(step_times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--long-tokens", type=int, default=2048)
    p.add_argument("--chunks", default="none,256,512")
    p.add_argument("--out", default="serve_chunked")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    runs: dict[str, list[dict]] = {str(c): [] for c in chunks}
    for r in range(args.rounds):
        for chunk in (chunks if r % 2 == 0 else list(reversed(chunks))):
            with C.LoadMonitor() as load:
                run = one_run(model, chunk, args.long_tokens)
            run["load"], run["loadavg"] = load.mean, os.getloadavg()[0]
            runs[str(chunk)].append(run)
            print(f"round {r} chunk {str(chunk):>4}: TPOT median {run['tpot_median_s'] * 1000:6.1f} ms, p99 "
                  f"{run['tpot_p99_s'] * 1000:7.1f} ms, long prompt TTFT {run['long_ttft_s']:.2f} s | other load "
                  f"{run['load']:.1f}, loadavg {run['loadavg']:.2f}", flush=True)
    meta = {"cpu": C.cpu_name(), "torch": torch.__version__, "threads": args.threads, "precision": args.precision,
            "long_tokens": args.long_tokens, "rounds": args.rounds, "date": time.strftime("%Y-%m-%d %H:%M")}
    lines = [f"# Chunked prefill ({meta['cpu']}, torch {meta['torch']}, {args.threads} thread, {args.precision}, "
             f"8 running requests, a {args.long_tokens}-token prompt arriving; medians of {args.rounds} rounds)", "",
             "| prefill_chunk | TPOT median | TPOT p99 | long prompt TTFT | other load |", "|---|---|---|---|---|"]
    for chunk, done in runs.items():
        med = lambda k: statistics.median(d[k] for d in done)  # noqa: E731
        lines.append(f"| {chunk} | {med('tpot_median_s') * 1000:.1f} ms | {med('tpot_p99_s') * 1000:.1f} ms | "
                     f"{med('long_ttft_s'):.2f} s | {med('load'):.1f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
