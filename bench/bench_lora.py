"""Side-by-side LoRA inference benchmark, deltatune vs peft, on the embedded SmolLM2-135M (batch 4x256, r=16, all-linear).

    python bench/bench_lora.py                     # every configuration, ~10 min on 2 cores
    python bench/bench_lora.py --repeat 2           # quicker, noisier
    python bench/bench_lora.py --one mixed/deltatune/bf16   # one configuration, prints a RESULT json line

Each configuration runs in a fresh subprocess (the script re-invokes itself with `--one CONFIG`), so that peak
RSS, allocator state and one-time costs never leak from one measurement into the next. Timings are medians of
wall-clock seconds on `torch.set_num_threads(2)`. Results go to bench/results/lora.json and lora.md.

Configurations (PREC is fp32, or bf16 = `torch.autocast("cpu", dtype=torch.bfloat16)` over fp32 weights):
  forward/{base,deltatune_unmerged,deltatune_merged,peft_unmerged,peft_merged}/PREC   no-grad forward
  mixed/{deltatune,peft}/PREC       4 adapters (random nonzero B), one per row, in one forward; the base
                                    forward is timed in the same process for the overhead ratio
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")
FORWARD_VARIANTS = ("base", "deltatune_unmerged", "deltatune_merged", "peft_unmerged", "peft_merged")
MIXED_NAMES = ["a", "b", "c", "d"]
RESULT_PREFIX = "RESULT "
REFERENCE_NOTE = (
    "Reference figures measured earlier on this kind of machine with peft 0.21 (batch 4x256, LoRA r=16 "
    "all-linear): forward 1.90 s fp32 / 0.79 s bf16; LoRA step 5.4 s fp32 / 2.0 s bf16, peak RSS about 4.0 GB; "
    "mixed batch of 4 adapters 1.05x the base forward."
)


def all_configs() -> list[str]:
    configs = [f"forward/{v}/{p}" for p in PRECISIONS for v in FORWARD_VARIANTS]
    configs += [f"mixed/{lib}/{p}" for p in PRECISIONS for lib in ("deltatune", "peft")]
    return configs


# ---- one configuration, in its own process ---------------------------------------------------------------
def _with_lora(model, lib: str, names: list[str]):
    """model with one LoRA adapter per name (the first active), by deltatune or by peft."""
    if lib == "deltatune":
        import deltatune as dt

        for name in names:
            dt.attach(model, dt.LoraConfig(**C.LORA), name=name, activate=name == names[0])
        return model
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(**C.LORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**C.LORA))
    return model


def measure(fn, args, repeat: int) -> dict:
    """Timings of fn (median wall seconds) with how much of its cores the process got and how busy the machine was."""
    with C.LoadMonitor() as monitor:
        timed = C.time_calls(fn, args.warmup, repeat, args.budget)
    return {
        **timed, "median_s": C.median(timed["times"]), "median_cpu_per_thread_s": C.median(timed["cpu_times"]) / args.threads,
        "cpu_share": sum(timed["cpu_times"]) / (sum(timed["times"]) * args.threads),
        "other_runnable": monitor.mean, "warmup": args.warmup,
    }


def _forward_fn(model, ids, precision: str, **kwargs):
    def forward():
        with torch.no_grad(), C.precision_context(precision):
            return model(input_ids=ids, use_cache=False, **kwargs).logits

    return forward


def run_forward(variant: str, precision: str, args) -> dict:
    model, _, loader = C.load_model()
    ids = C.input_ids(model.config.vocab_size)
    if variant != "base":
        lib, state = variant.split("_")
        model = _with_lora(model, lib, ["a"])
        if state == "merged":
            if lib == "deltatune":
                import deltatune as dt

                dt.merge(model)
            else:
                model.merge_adapter()
    model.eval()
    return {**measure(_forward_fn(model, ids, precision), args, args.repeat), "peak_rss_gb": C.peak_rss_gb(),
            "loader": loader}


def run_mixed(lib: str, precision: str, args) -> dict:
    model, _, loader = C.load_model()
    ids = C.input_ids(model.config.vocab_size)
    base_forward = _forward_fn(model, ids, precision)
    base = measure(base_forward, args, args.repeat)
    base_logits = base_forward()
    model = _with_lora(model, lib, MIXED_NAMES)
    C.fill_lora_B(model, seed=1)
    model.eval()
    if lib == "deltatune":
        import deltatune as dt

        plain = _forward_fn(model, ids, precision)

        def mixed():
            with dt.route(model, MIXED_NAMES):
                return plain()
    else:
        mixed = _forward_fn(model, ids, precision, adapter_names=MIXED_NAMES)
    result = measure(mixed, args, args.repeat)
    # Each row must differ from the base: proof that its adapter was applied.
    row_diff = (mixed() - base_logits).abs().flatten(1).max(dim=1).values.tolist()
    return {
        **result, "base": base, "base_median_s": base["median_s"], "ratio_to_base": result["median_s"] / base["median_s"],
        "other_runnable": max(result["other_runnable"], base["other_runnable"]),
        "row_max_abs_diff_vs_base": row_diff, "peak_rss_gb": C.peak_rss_gb(), "loader": loader,
    }


def run_one(config: str, args) -> dict:
    if config == "prepare":  # convert and cache the model once, outside every timed process
        _, _, loader = C.load_model()
        return {"loader": loader}
    kind, what, precision = config.split("/")
    if precision not in PRECISIONS:
        raise SystemExit(f"--one {config}: precision must be one of {PRECISIONS}")
    torch.manual_seed(0)
    if kind == "forward" and what in FORWARD_VARIANTS:
        return run_forward(what, precision, args)
    if kind == "mixed" and what in ("deltatune", "peft"):
        return run_mixed(what, precision, args)
    raise SystemExit(f"--one {config!r} is not a configuration; choose from: {', '.join(all_configs())}")


# ---- the driver -------------------------------------------------------------------------------------------
def wait_for_quiet(max_wait: float) -> float:
    """Wait (at most max_wait s) until no other task has been runnable for 2 s; the seconds waited."""
    start, quiet_since = time.perf_counter(), time.perf_counter()
    while time.perf_counter() - start < max_wait:
        if C.other_runnable() > 0:
            quiet_since = time.perf_counter()
        elif time.perf_counter() - quiet_since >= 2.0:
            break
        time.sleep(0.1)
    return time.perf_counter() - start


def spawn(config: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", config, "--repeat", str(args.repeat),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--budget", str(args.budget)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"over --timeout {args.timeout} s", "stderr_tail": str(exc.stderr)[-3000:],
                "process_wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "process_wall_s": wall}
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:], "process_wall_s": wall}


CONTENDED = 0.5  # mean other runnable tasks above which a timing is flagged
WALL, CPU = "median_s", "median_cpu_per_thread_s"


def _s(result: dict | None, key: str) -> str:
    """Seconds, with † when other processes competed for the cores during the measurement."""
    if not result or key not in result:
        return "—"
    return f"{result[key]:.3f} s" + (" †" if result.get("other_runnable", 0) > CONTENDED else "")


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return a[key] / b[key] if a and b and key in a and key in b else None


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "—"


def table_rows(results: dict, key: str) -> list[tuple[str, ...]]:
    """(config, precision, deltatune, peft or base, ratio) rows for one metric (wall or CPU seconds)."""
    r = {k: v for k, v in results.items() if "error" not in v}
    rows = []
    for p in PRECISIONS:
        f = {v: r.get(f"forward/{v}/{p}") for v in FORWARD_VARIANTS}
        base = f["base"]
        rows.append(("forward, base model alone", p, "—", f"{_s(base, key)} (base)", "—"))
        for state in ("unmerged", "merged"):
            ours, theirs = f[f"deltatune_{state}"], f[f"peft_{state}"]
            rows.append((f"forward, LoRA {state}", p, _s(ours, key), _s(theirs, key), _x(_ratio(ours, theirs, key))))
        for state in ("unmerged", "merged"):
            ours, theirs = f[f"deltatune_{state}"], f[f"peft_{state}"]
            rows.append((f"forward, LoRA {state} vs base", p, _s(ours, key), f"{_s(base, key)} (base)",
                         f"{_x(_ratio(ours, base, key))} (peft {_x(_ratio(theirs, base, key))})"))
    for p in PRECISIONS:
        ours, theirs = r.get(f"mixed/deltatune/{p}"), r.get(f"mixed/peft/{p}")
        rows.append(("mixed batch, 4 adapters (route vs adapter_names)", p, _s(ours, key), _s(theirs, key),
                     _x(_ratio(ours, theirs, key))))
        to_base = lambda x: _ratio(x, x["base"], key) if x else None  # noqa: E731
        rows.append(("mixed batch, 4 adapters vs base forward (same process)", p, _s(ours, key),
                     f"{_s(ours and ours['base'], key)} (base)", f"{_x(to_base(ours))} (peft {_x(to_base(theirs))})"))
    return [row for row in rows if not (row[2].startswith("—") and row[3].startswith("—"))]  # not measured


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    return ["| config | precision | deltatune | peft (or base) | ratio |", "|---|---|---|---|---|",
            *[f"| {' | '.join(row)} |" for row in rows]]


def markdown(results: dict, meta: dict) -> str:
    warmups = [v["warmup"] for v in results.values() if "warmup" in v]  # --update runs may have used another
    meta = {**meta, "warmup": max(set(warmups), key=warmups.count) if warmups else meta["warmup"]}
    lines = [
        "# LoRA benchmark: deltatune vs peft",
        "",
        f"SmolLM2-135M-Instruct, batch {C.BATCH}x{C.SEQ} random token ids, LoRA r=16 alpha=32 all-linear, "
        f"{meta['threads']} torch threads, each configuration in a fresh process. Forward: median of up to "
        f"{meta['repeat']} no-grad forwards after {meta['warmup']} warmup (training steps: bench_train.py); "
        f"fewer samples once the timed calls of a configuration pass {meta['budget_s']:.0f} s (at least one; the "
        f"counts are in lora.json); best of {meta['rounds']} interleaved round(s). bf16 = "
        "`torch.autocast(\"cpu\", dtype=torch.bfloat16)` over fp32 weights. ratio = deltatune / right-hand "
        "column (< 1: deltatune faster or smaller); in the \"vs base\" rows, peft's own ratio is in brackets.",
        "",
        "Wall-clock seconds:",
        "",
        *_table(table_rows(results, WALL)),
        "",
        f"> {REFERENCE_NOTE}",
        "",
        f"† while this was measured, other processes were runnable on the same {meta['cores']} cores (mean > "
        f"{CONTENDED} other runnable tasks, sampled every 0.25 s; per-configuration `other_runnable` and "
        "`cpu_share` are in lora.json): that wall time is inflated and ratios involving it are unreliable.",
        "",
        "Process CPU seconds per thread (CPU time / threads): an estimate of the uncontended wall time that time "
        "slicing with other processes inflates much less (spin-waiting and cache sharing still do):",
        "",
        *_table(table_rows(results, CPU)),
        "",
        f"Machine: {meta['cpu']} ({meta['cpu_capability']} kernels), {meta['cores']} cores; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}; model loaded by {meta['loader']}; whole run "
        f"{meta['total_wall_s']:.0f} s.",
    ]
    odd = {k: v["warmup"] for k, v in results.items() if v.get("warmup", meta["warmup"]) != meta["warmup"]}
    if odd:
        lines += ["", "Measured with a different warmup: " + ", ".join(f"`{k}` ({w})" for k, w in odd.items())]
    failed = {k: v for k, v in results.items() if "error" in v}
    if failed:
        lines += ["", "Failed configurations: " + ", ".join(f"`{k}` ({v['error']})" for k, v in failed.items())]
    return "\n".join(lines) + "\n"


def drive(args) -> None:
    import peft
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepared = spawn("prepare", args)
    if "error" in prepared:
        raise SystemExit(f"could not load the model:\n{prepared['stderr_tail']}")
    configs = all_configs()
    if args.only:  # names or fnmatch patterns, e.g. "*/fp32" or "mixed/*"
        patterns = args.only.split(",")
        configs = [c for c in configs if any(fnmatch.fnmatchcase(c, pat) for pat in patterns)]
        if not configs:
            raise SystemExit(f"--only {args.only!r} matches no configuration; choose from: {', '.join(all_configs())}")
    meta = {
        "cpu": C.cpu_name(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "loader": prepared["loader"],
        "repeat": args.repeat, "warmup": args.warmup, "rounds": args.rounds,
        "budget_s": args.budget, "reference": REFERENCE_NOTE,
    }
    results: dict[str, dict] = {}
    if args.update and (RESULTS / "lora.json").exists():  # keep earlier results of the configurations not rerun
        earlier = json.loads((RESULTS / "lora.json").read_text())
        results = {k: v for k, v in earlier["results"].items() if k not in configs}
        meta["earlier_runs"] = earlier["meta"].get("earlier_runs", []) + [earlier["meta"]]
        start -= earlier["meta"].get("total_wall_s", 0)
    for round_ in range(1, args.rounds + 1):  # interleaved passes; each configuration keeps its fastest run
        for i, config in enumerate(configs, 1):
            waited = wait_for_quiet(args.max_wait)
            res = {**spawn(config, args), "waited_for_quiet_s": waited, "round": round_}
            shown = res.get("error") or (
                f"median {res['median_s']:.3f} s, peak RSS {res['peak_rss_gb']:.2f} GB, "
                f"cpu share {res['cpu_share']:.2f}, other runnable {res['other_runnable']:.1f}")
            print(f"[round {round_}, {i}/{len(configs)}] {config}: {shown} ({res['process_wall_s']:.0f} s)", flush=True)
            old = results.get(config)
            if old is None or "error" in old or ("error" not in res and res["median_s"] < old["median_s"]):
                res["round_medians"] = (old or {}).get("round_medians", []) + [res.get("median_s")]
                results[config] = res
            else:
                old["round_medians"].append(res.get("median_s"))
            meta["total_wall_s"] = time.perf_counter() - start
            (RESULTS / "lora.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results, meta)
    (RESULTS / "lora.md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help="run one configuration in this process and print a RESULT json line")
    parser.add_argument("--only", help="comma-separated configurations or patterns, e.g. '*/fp32' (default: all)")
    parser.add_argument("--repeat", type=int, default=5, help="timed forwards per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--budget", type=float, default=20, help="stop timing a configuration once its timed "
                        "calls add up to this many seconds, after at least one (default 20)")
    parser.add_argument("--update", action="store_true", help="rerun only the --only configurations and keep the "
                        "other results already in bench/results/lora.json")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over the configurations; each "
                        "keeps its fastest run (default 1; 2-3 on a shared machine)")
    parser.add_argument("--max-wait", type=float, default=15, help="seconds to wait for an idle machine before "
                        "each configuration (default 15; 0: do not wait)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a configuration is abandoned")
    args = parser.parse_args()
    if args.repeat < 1 or args.warmup < 0:
        parser.error(f"--repeat must be >= 1 and --warmup >= 0, got {args.repeat}, {args.warmup}")
    if args.one:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps({"config": args.one, **run_one(args.one, args)}), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
