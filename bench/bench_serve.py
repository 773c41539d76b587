"""Multi-adapter serving throughput on the embedded SmolLM2-135M: deltatune's engine against the alternatives.

    python bench/bench_serve.py                                  # the issue's workload (slow on 2 shared cores)
    python bench/bench_serve.py --requests 32 --new-tokens 32    # smaller
    python bench/bench_serve.py --config all16                   # rank 16 on all linear layers

Workload: `--requests` requests arriving together, prompts of 64-128 random tokens, `--new-tokens` tokens each
(end-of-sequence ignored, so every request generates exactly that many), greedy; adapters of rank 8 on q_proj
and v_proj (`--config qv8`) or rank 16 on all linear layers (`all16`), random nonzero B; bf16 base weights where
the CPU computes bf16 natively, else fp32 (adapters fp32, as peft keeps them). Rows:

  base            the engine, every request on the base model
  mixed K         the engine, request i on adapter i mod K, all in one continuous batch (stacked LoRA)
  mixed K routed  the same, through the core's per-adapter routed path (Engine(fused_lora=False))
  turns K         the engine on one adapter's requests at a time (what serving without mixing does)
  peft K          peft's mixed-adapter generate(adapter_names=...), one left-padded batch
  paired          decode steps of base, mixed K and mixed K routed in strict alternation, median each: the
                  ratio that other processes' load cannot tilt

Engine rows run `--rounds` interleaved rounds and keep the best (a burst of other load hits one round); the
slow `turns` and `peft` rows run once. Throughput is generated tokens per wall-clock second; TTFT (arrival to first token) and TPOT (mean time per
later token) are per request, p50/p99. The load of other processes is sampled during each row: on a shared
machine, figures are only comparable within a run. Results: bench/results/serve_<config>.json and .md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
import deltatune as dt  # noqa: E402
from deltatune.core.lowrank import low_rank_factors  # noqa: E402
from deltatune.models import load_model  # noqa: E402
from deltatune.serve import Engine, SamplingParams  # noqa: E402
from deltatune.serve.registry import AdapterRegistry  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {"qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
           "all16": dict(r=16, lora_alpha=32, target_modules="all-linear")}


def make_adapters(model, config: str, count: int, root: Path) -> list[str]:
    """Save `count` random LoRA adapters under root/ (deltatune's format = peft's); returns their names."""
    names = [f"ad{i}" for i in range(count)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        dt.attach(model, dt.LoraConfig(init_lora_weights=False, **CONFIGS[config]), name, activate=False)
        with torch.no_grad():
            for _, delta in dt.adapters(model)[name].deltas(model):
                delta.lora_B.weight.normal_(0, 0.01)
        dt.save_adapter(model, root / name, name)
        dt.delete_adapter(model, name)
    return names


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_engine(engine: Engine, prompts, names, new_tokens: int) -> dict:
    with C.LoadMonitor() as load:
        start = time.perf_counter()
        outs = engine.generate(prompts, names, max_new_tokens=new_tokens, ignore_eos=True)
        wall = time.perf_counter() - start
    ttft = [o.first_token_s for o in outs]
    tpot = [(o.total_s - o.first_token_s) / (len(o.token_ids) - 1) for o in outs]
    tokens = sum(len(o.token_ids) for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "ttft_p50": pct(ttft, .5),
            "ttft_p99": pct(ttft, .99), "tpot_p50": pct(tpot, .5), "tpot_p99": pct(tpot, .99), "load": load.mean}


def run_turns(engine: Engine, prompts, names, new_tokens: int) -> dict:
    """One adapter's requests at a time; a request's TTFT counts from the start (it waited for the others)."""
    with C.LoadMonitor() as load:
        start = time.perf_counter()
        ttft, tpot, tokens = [], [], 0
        for name in dict.fromkeys(names):
            group = [p for p, n in zip(prompts, names) if n == name]
            begun = time.perf_counter() - start
            for o in engine.generate(group, [name] * len(group), max_new_tokens=new_tokens, ignore_eos=True):
                ttft.append(begun + o.first_token_s)
                tpot.append((o.total_s - o.first_token_s) / (len(o.token_ids) - 1))
                tokens += len(o.token_ids)
        wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "ttft_p50": pct(ttft, .5),
            "ttft_p99": pct(ttft, .99), "tpot_p50": pct(tpot, .5), "tpot_p99": pct(tpot, .99), "load": load.mean}


def paired_decode(model, tokenizer, prompts, configs: dict[str, tuple[list, bool] | tuple[list, bool, str]],
                  steps: int) -> dict[str, float]:
    """Median decode-step seconds of each configuration, steps taken in strict alternation on the same prompts,
    so that other processes' load falls on every configuration alike (the rows above ran minutes apart).
    A configuration is (adapter per row, fused kernels or the routed path[, the fused decode kernel: "auto",
    "stacked", "segmented" or "segmented-torch"])."""
    engines = {}
    for label, (row_names, fused, *decode) in configs.items():
        engine = Engine(model, tokenizer, max_batch_size=len(prompts), max_prefill_tokens=1 << 30, fused_lora=fused)
        if fused and decode:  # "segmented-torch": the segmented product in torch ops, not serve/sgmv.py's kernel
            engine.fused.decode = decode[0].removesuffix("-torch")
            engine.fused.sgmv = not decode[0].endswith("-torch")
        for prompt, name in zip(prompts, row_names):
            engine.add_request(prompt, name, SamplingParams(max_new_tokens=steps + 3, ignore_eos=True))
        engine.prefill_step()
        engine.decode_step()  # warm-up
        engines[label] = engine
    times: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(steps):
        for label, engine in engines.items():
            start = time.perf_counter()
            engine.decode_step()
            times[label].append(time.perf_counter() - start)
    del engines  # their stacks: a set of 32 rank-16 all-linear adapters is 625 MB in fp32
    return {label: statistics.median(t) for label, t in times.items()}


def memory_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """Bytes per second one thread reads (the sum of an fp32 tensor far larger than the caches), best of
    `repeat`: the least disturbed by other load, so the bound it gives is the tightest."""
    data = torch.ones(mib << 18)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def base_cost(model) -> tuple[float, float]:
    """(multiply-adds x 2 of one token through the base's linear layers and head, the base weights' bytes), taken
    before any adapter is attached; the attention over ~100 cached positions (about 2% more) is left out."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * linear, float(sum(p.numel() * p.element_size() for p in model.parameters()))


def adapter_cost(model, row_names: list) -> tuple[float, float]:
    """(bytes of the fp32 factors of the distinct adapters of `row_names`, FLOPs of each row's own rank)."""
    per_adapter: dict[str, tuple[float, float]] = {}
    for name in {n for n in row_names if n is not None}:
        size = 0.0
        for _, delta in dt.adapters(model)[name].deltas(model):
            A, B, _ = low_rank_factors(delta)
            size += A.numel() + B.numel()
        per_adapter[name] = (4.0 * size, 2.0 * size)  # fp32 bytes; one token's multiply-adds x 2
    return (sum(b for b, _ in per_adapter.values()),
            sum(per_adapter[n][1] for n in row_names if n is not None))


def decode_bound(model, row_names: list, base_step_s: float, bandwidth: float, base: tuple[float, float]) -> dict:
    """The step the adapters could cost at best: the base's measured step, plus reading each distinct adapter's
    factors once at the measured bandwidth, plus each row's own-rank FLOPs at the base step's measured rate."""
    flops_per_row, base_bytes = base
    rate = flops_per_row * len(row_names) / base_step_s
    factor_bytes, own_flops = adapter_cost(model, row_names)
    step = base_step_s + factor_bytes / bandwidth + own_flops / rate
    return {"bandwidth_gb_s": bandwidth / 1e9, "base_gflop_s": rate / 1e9, "factor_mb": factor_bytes / 1e6,
            "base_mb": base_bytes / 1e6, "base_read_ms": base_bytes / bandwidth * 1e3, "own_gflop": own_flops / 1e9,
            "bound_step_s": step, "bound_ratio": base_step_s / step}


def paired_kernels(model, tokenizer, prompts, internal: dict, adapters: list[str], counts: list[int],
                   steps: int, base: tuple[float, float]) -> dict:
    """For each adapter count K: base, the stacked and the segmented decode kernel and the cost rule's choice
    (auto), decode steps in strict alternation; with each K's bound (decode_bound)."""
    out = {}
    for k in counts:
        names = [internal[adapters[i % k]] for i in range(len(prompts))]
        configs = {"base": ([None] * len(prompts), True), f"stacked {k}": (names, True, "stacked"),
                   f"segmented-torch {k}": (names, True, "segmented-torch"),
                   f"segmented {k}": (names, True, "segmented"), f"auto {k}": (names, True, "auto")}
        bandwidth = memory_bandwidth()
        paired = paired_decode(model, tokenizer, prompts, configs, steps)
        bandwidth = max(bandwidth, memory_bandwidth())
        with C.LoadMonitor() as load:
            time.sleep(1.0)
        bound = decode_bound(model, names, paired["base"], bandwidth, base)
        out[k] = {"steps_s": paired, "bound": bound, "load": load.mean}
        line = ", ".join(f"{label} {t * 1e3:.0f} ms ({paired['base'] / t:.2f}x)" for label, t in paired.items())
        print(f"paired K={k}: {line}; bound {bound['bound_step_s'] * 1e3:.0f} ms ({bound['bound_ratio']:.2f}x: "
              f"{bound['factor_mb']:.0f} MB of factors at {bound['bandwidth_gb_s']:.1f} GB/s, {bound['own_gflop']:.2f} "
              f"GFLOP at the base's {bound['base_gflop_s']:.0f} GFLOP/s); other load {load.mean:.1f}", flush=True)
    return out


def run_peft(dtype, root: Path, adapters: list[str], prompts, names, new_tokens: int) -> dict:
    import peft

    base, _ = load_model(None, dtype=dtype)
    model = peft.PeftModel.from_pretrained(base, str(root / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(str(root / name), adapter_name=name)
    model.eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate() wants for a decoder
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    adapter_names = ["__base__" if n is None else n for n in names]
    with C.LoadMonitor() as load, torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        wall = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(prompts)
    return {"wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall, "load": load.mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="qv8")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", default="1,8,32", help="distinct adapters per mixed row, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="0: one per idle core (deltatune.threads)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--out", default=None, help="results file stem (default serve_CONFIG)")
    parser.add_argument("--rounds", type=int, default=2, help="engine rows: best of this many interleaved rounds")
    parser.add_argument("--skip", default="", help="rows to leave out: any of routed,paired,turns,peft")
    parser.add_argument("--kernels", action="store_true",
                        help="only the decode kernels, paired: base, stacked, segmented (torch ops and the C++ "
                        "kernel of serve/sgmv.py) and auto at each --adapters count")
    parser.add_argument("--steps", type=int, default=8, help="paired decode steps of each configuration (median)")
    args = parser.parse_args()
    from deltatune.threads import choose_threads

    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and torch.cpu._is_avx512_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32
    counts = [int(k) for k in args.adapters.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    model, tokenizer = load_model(None, dtype=dtype)
    base = base_cost(model)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (int(torch.randint(64, 129, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(args.requests)]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = make_adapters(model, args.config, max(counts), root)
        registry = AdapterRegistry(model, adapter_dirs=[root])
        internal = {n: registry.acquire(n) for n in adapters}
        if args.kernels:
            kernels = paired_kernels(model, tokenizer, prompts, internal, adapters, counts, args.steps, base)
            write_kernels(args, threads, why, dtype, kernels)
            return
        engine = Engine(model, tokenizer, max_batch_size=args.requests)
        engine.generate(prompts[:4], [None, internal[adapters[0]], None, internal[adapters[-1]]], max_new_tokens=4)  # warm-up

        def report(label: str, row: dict) -> None:
            rows[label] = row
            print(f"{label:<18} {row['tok_per_s']:7.1f} tok/s  wall {row['wall_s']:6.1f}s  other load {row['load']:.1f}"
                  + (f"  TTFT p50 {row['ttft_p50']:.2f}s p99 {row['ttft_p99']:.2f}s  TPOT p50 {row['tpot_p50'] * 1e3:.0f}ms "
                     f"p99 {row['tpot_p99'] * 1e3:.0f}ms" if "ttft_p50" in row else ""), flush=True)

        k = max(counts)
        names = [internal[adapters[i % k]] for i in range(len(prompts))]
        routed = Engine(model, tokenizer, max_batch_size=args.requests, fused_lora=False)
        engine_rows = [("base", engine, [None] * len(prompts))]
        engine_rows += [(f"mixed {c}", engine, [internal[adapters[i % c]] for i in range(len(prompts))]) for c in counts]
        engine_rows += [] if "routed" in skip else [(f"mixed {k} routed", routed, names)]
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):  # rounds interleave the rows, so a burst of other load hits one round
            for label, eng, row_names in engine_rows:
                row = run_engine(eng, prompts, row_names, args.new_tokens)
                print(f"  round {round_ + 1} {label}: {row['tok_per_s']:.1f} tok/s (other load {row['load']:.1f})", flush=True)
                if label not in best or row["tok_per_s"] > best[label]["tok_per_s"]:
                    best[label] = row
        for label, _, _ in engine_rows:
            report(label, best[label])
        if "paired" not in skip:
            configs = {"base": ([None] * len(prompts), True), f"mixed {k}": (names, True)}
            if "routed" not in skip:
                configs[f"mixed {k} routed"] = (names, False)
            paired = paired_decode(model, tokenizer, prompts, configs, steps=args.steps)
            for label, seconds in paired.items():
                rows.setdefault(label, {})["paired_step_s"] = seconds
            print("paired decode steps: " + ", ".join(f"{l} {t * 1e3:.0f} ms" for l, t in paired.items()), flush=True)
        if "turns" not in skip:
            report(f"turns {k}", run_turns(engine, prompts, names, args.new_tokens))
        if "peft" not in skip:
            del engine, registry
            model = None
            report(f"peft {k}", run_peft(dtype, root, adapters, prompts, [adapters[i % k] for i in range(len(prompts))],
                                         args.new_tokens))
    meta = {"cpu": C.cpu_name(), "threads": threads, "threads_why": why, "dtype": str(dtype).removeprefix("torch."),
            "config": args.config, "requests": args.requests, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"serve_{args.config}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table(meta, rows))
    print(table(meta, rows))


def write_kernels(args, threads: int, why: str, dtype, kernels: dict) -> None:
    meta = {"cpu": C.cpu_name(), "threads": threads, "threads_why": why, "dtype": str(dtype).removeprefix("torch."),
            "config": args.config, "requests": args.requests, "steps": args.steps, "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M"), "uptime": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"serve_{args.config}_kernels"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "kernels": {str(k): v for k, v in kernels.items()}},
                                                     indent=2) + "\n")
    lines = [f"{meta['config']} decode kernels: {meta['requests']} running requests (prompts 64-128), decode steps in strict "
             f"alternation, median of {meta['steps']}, {meta['dtype']} base, adapters fp32, {threads} thread(s), {meta['cpu']}, "
             f"torch {meta['torch']}, {meta['when']}, load average {meta['uptime'][0]:.1f}", "",
             "| adapters | base | stacked | segmented, torch ops | segmented, C++ (serve/sgmv.py) | auto (the cost rule) | "
             "bound | auto / bound | factors | other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, row in kernels.items():
        t, b = row["steps_s"], row["bound"]
        cell = lambda label: f"{t[label] * 1e3:.0f} ms ({t['base'] / t[label]:.2f}x)"  # noqa: E731
        torch_ops = cell(f"segmented-torch {k}") if f"segmented-torch {k}" in t else "—"
        lines.append(f"| {k} | {t['base'] * 1e3:.0f} ms | {cell(f'stacked {k}')} | {torch_ops} | {cell(f'segmented {k}')} | "
                     f"{cell(f'auto {k}')} | {b['bound_step_s'] * 1e3:.0f} ms ({b['bound_ratio']:.2f}x) | "
                     f"{b['bound_step_s'] / t[f'auto {k}']:.0%} | {b['factor_mb']:.0f} MB | {row['load']:.1f} |")
    b = next(iter(kernels.values()))["bound"]
    lines += ["", f"Bound = base step + the distinct adapters' fp32 factors read once at the measured bandwidth "
              f"({b['bandwidth_gb_s']:.1f} GB/s, one thread summing 512 MiB, best of 5) + each row's own-rank FLOPs at the "
              f"base step's measured rate ({b['base_gflop_s']:.0f} GFLOP/s); the base's own {b['base_mb']:.0f} MB would take "
              f"{b['base_read_ms']:.0f} ms at that bandwidth, so its step is compute-bound."]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


def table(meta: dict, rows: dict) -> str:
    base = rows["base"]["tok_per_s"]
    lines = [f"{meta['config']}: {meta['requests']} requests x {meta['new_tokens']} new tokens, prompts 64-128, greedy, "
             f"{meta['dtype']} base, {meta['threads']} thread(s), engine rows best of {meta.get('rounds', 1)}, {meta['cpu']}, torch {meta['torch']}, {meta['when']}", "",
             "| row | tok/s | vs base | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | other load |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        if "tok_per_s" not in row:
            continue
        timing = (f"{row['ttft_p50']:.2f} s | {row['ttft_p99']:.2f} s | {row['tpot_p50'] * 1e3:.0f} ms | "
                  f"{row['tpot_p99'] * 1e3:.0f} ms" if "ttft_p50" in row else "- | - | - | -")
        lines.append(f"| {label} | {row['tok_per_s']:.1f} | {row['tok_per_s'] / base:.2f}x | {timing} | {row['load']:.1f} |")
    paired = {label: row["paired_step_s"] for label, row in rows.items() if "paired_step_s" in row}
    if paired:
        lines += ["", "Decode steps of the full batch taken in strict alternation (median of 8 each; other load falls on all "
                  "alike): " + ", ".join(f"{label} {t * 1e3:.0f} ms ({paired['base'] / t:.2f}x base)" for label, t in paired.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
