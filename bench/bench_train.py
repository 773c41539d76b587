"""Training-step benchmark on the embedded SmolLM2-135M: peft + transformers against deltatune's speed and memory modes.

    python bench/bench_train.py                        # every configuration, ~20 min on 2 idle cores
    python bench/bench_train.py --only peft/bf16,speed/bf16 --steps 2
    python bench/bench_train.py --one speed/bf16       # one configuration here; prints a RESULT json line

Batch 4x256 random token ids (labels = the ids), LoRA r=16 alpha=32 all-linear, `torch.set_num_threads(2)`.
Every configuration runs in a fresh subprocess (peak RSS, allocator state and one-time costs never leak between
them); `--rounds N` interleaves N passes over all configurations and keeps each one's best median, which is the
fairest number when other work shares the machine. Step time: median of `--steps` steps after `--warmup`. Peak
RSS: ru_maxrss of that process (model loading included). After the timed steps, `--breakdown` instrumented
steps split the time into forward (decoder), loss (head + cross-entropy forward), loss backward (until the
gradient reaches the last hidden state), backward (the decoder's) and optimizer (step + zero_grad).

Configurations are SETUP/PRECISION; PRECISION is fp32 (no autocast) or bf16 (`torch.autocast("cpu",
dtype=torch.bfloat16)`). See SETUPS for what each setup changes. Results: bench/results/train.json and train.md
(one run on one machine per file: `--name train-epyc` keeps another CPU's table beside it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from _common import cpu_name  # bench/ is on sys.path when this script runs

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ = 4, 256
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")
PRECISIONS = ("fp32", "bf16")
RESULT_PREFIX = "RESULT "
REFERENCE_NOTE = ("Reference measured earlier on this kind of machine: peft 2.0 s/step bf16, 5.4 s/step fp32, "
                  "about 4.0 GB peak RSS.")


@dataclass(frozen=True)
class Setup:
    what: str  # one line for the table
    lib: str = "deltatune"  # "peft" or "deltatune"
    loss: str = "hf"  # "hf": model(input_ids, labels=labels).loss; "chunked": deltatune.train.loss.causal_lm_loss
    chunk: int = 0  # tokens per chunk of the chunked loss; 0: the loop's default (128 for SmolLM2 on a CPU)
    base_bf16: bool = False  # frozen nn.Linear base weights stored in bf16 (only under bf16 autocast)
    fused: bool = False  # AdamW(fused=True) via build_optimizer; else torch's default AdamW (a per-tensor loop on CPU)
    compile: bool = False  # torch.compile each decoder layer (one graph, reused by all 30)
    checkpointing: bool = False  # HF gradient checkpointing, non-reentrant


SETUPS: dict[str, Setup] = {
    "peft": Setup("peft + transformers: model(ids, labels=ids).loss; torch's default AdamW", lib="peft"),
    "deltatune-hf": Setup("deltatune LoRA layers with peft's step (same HF loss and AdamW)"),
    "speed": Setup("speed mode: chunked fused loss + fused AdamW (+ bf16 frozen base weights under bf16)",
                   loss="chunked", base_bf16=True, fused=True),
    "speed+compile": Setup("speed mode + torch.compile of each decoder layer", loss="chunked", base_bf16=True,
                           fused=True, compile=True),
    "memory": Setup("memory mode: speed mode + gradient checkpointing", loss="chunked", base_bf16=True, fused=True,
                    checkpointing=True),
    # ablations, run with --only
    "chunked": Setup("peft's step with deltatune layers and the chunked loss only", loss="chunked"),
    "chunked1024": Setup("as chunked, 1024-token chunks", loss="chunked", chunk=1024),
    "bf16base": Setup("peft's step with deltatune layers and bf16 frozen base weights only", base_bf16=True),
}
DEFAULT_CONFIGS = [f"{s}/{p}" for p in PRECISIONS for s in ("peft", "deltatune-hf", "speed", "memory")]


# ---- one configuration, in its own process ---------------------------------------------------------------
def load_base() -> tuple[nn.Module, str]:
    """The embedded SmolLM2 in fp32 (deltatune.models.load_model, else the converted copy at /tmp/smol)."""
    try:
        from deltatune.models import load_model

        model, _ = load_model(dtype=torch.float32)
        return model.eval(), "deltatune.models.load_model"
    except ImportError:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained("/tmp/smol", dtype=torch.float32).eval(), "/tmp/smol"


def build(setup: Setup, precision: str):
    """(model with LoRA, its HF causal-LM module, optimizer, info) for one setup."""
    model, loader = load_base()
    info: dict = {"loader": loader, "rss_after_load_gb": current_rss_gb()}
    if setup.lib == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA))
        hf = model.get_base_model()
    else:
        import deltatune as dt

        model = hf = dt.attach(model, dt.LoraConfig(**LORA))
    model.train()
    if setup.base_bf16 and precision == "bf16":  # what the training loop does (frozen_bf16: true)
        from deltatune.train.memory import copy_out_of_file_mappings, store_frozen_linears_in_bf16

        info["bf16_linears"] = store_frozen_linears_in_bf16(hf)
        copy_out_of_file_mappings(hf)
    if setup.checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.compile:
        for layer in hf.model.layers:
            layer.compile(dynamic=False)
    if setup.fused:
        from deltatune.train.config import OptimConfig
        from deltatune.train.optim import build_optimizer

        optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    info["optimizer"] = "fused" if optimizer.param_groups[0].get("fused") else (
        "foreach" if optimizer.param_groups[0].get("foreach") else "default (for-loop)")
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, hf, optimizer, info


def precision_context(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def make_step(setup: Setup, precision: str, model, hf, optimizer, ids) -> Callable[[bool], dict]:
    """One optimizer step through the public API, as a training loop would run it."""
    from deltatune.train.loss import causal_lm_loss

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step(first: bool = False) -> dict:
        with precision_context(precision):
            if setup.loss == "hf":
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            else:
                total, tokens = causal_lm_loss(hf, batch, setup.chunk)
                loss = total / tokens
        loss.backward()
        out = {"loss": loss.item()}
        if first:  # before any update: the same for every setup of one precision (B = 0)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            out["grad_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


def make_breakdown(setup: Setup, precision: str, hf, optimizer, ids) -> Callable[[], dict[str, float]]:
    """The same step split into phases; the loss backward ends when the gradient reaches the last hidden state."""
    from deltatune.train.loss import _ChunkedLinearCE, auto_chunk_size

    decoder, head = hf.model, hf.get_output_embeddings()
    targets = ids[:, 1:].reshape(-1)

    def head_loss(hidden: torch.Tensor) -> torch.Tensor:
        if setup.loss == "hf":
            return hf.loss_function(logits=head(hidden), labels=ids, vocab_size=hf.config.vocab_size)
        rows = hidden[:, :-1].flatten(0, 1)
        chunk = setup.chunk or auto_chunk_size(head.weight.shape[0], rows.device)
        return _ChunkedLinearCE.apply(rows, head.weight, head.bias, targets, chunk) / targets.numel()

    def phases() -> dict[str, float]:
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        with precision_context(precision):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            t1 = time.perf_counter()
            loss = head_loss(hidden)
        t2 = time.perf_counter()
        hidden.register_hook(lambda grad: marks.setdefault("at_hidden", time.perf_counter()) and None)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        at_hidden = marks.get("at_hidden", t2)
        return {"forward": t1 - t0, "loss": t2 - t1, "loss_backward": at_hidden - t2, "backward": t3 - at_hidden,
                "optimizer": t4 - t3}

    return phases


def run_one(name: str, args) -> dict:
    setup_name, _, precision = name.partition("/")
    if setup_name not in SETUPS or precision not in PRECISIONS:
        raise SystemExit(f"--one {name!r}: use SETUP/PRECISION with SETUP in {', '.join(SETUPS)} and PRECISION in {PRECISIONS}")
    setup = SETUPS[setup_name]
    torch.manual_seed(0)
    model, hf, optimizer, info = build(setup, precision)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    step = make_step(setup, precision, model, hf, optimizer, ids)
    start = time.perf_counter()
    first = step(first=True)
    first_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times, cpu, faults, losses = [], [], [], [first["loss"]]
    for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        losses.append(step()["loss"])
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    phases = make_breakdown(setup, precision, hf, optimizer, ids)
    parts = [phases() for _ in range(args.breakdown)]
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]} if parts else {}
    median = statistics.median(times)
    return {
        "steps": args.steps, "warmup": args.warmup,
        **info, "setup": dataclasses.asdict(setup), "precision": precision, "times": times, "median_s": median, "min_s": min(times), "cpu_s": cpu,
        "first_step_s": first_s, "compile_s": max(0.0, first_s - median) if setup.compile else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "minor_faults_per_step": statistics.median(faults), "loss_step0": first["loss"], "grad_norm_step0": first["grad_norm"],
        "losses": losses, "breakdown_s": breakdown,
    }


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


# ---- the driver -------------------------------------------------------------------------------------------
def spawn(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--breakdown", str(args.breakdown), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "process_wall_s": wall, "load_avg": os.getloadavg()}
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:], "process_wall_s": wall}


def best_of(runs: list[dict]) -> dict:
    """The round with the lowest median (least disturbed by other load), with every round's median kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = min(ok, key=lambda r: r["median_s"])
    return {**best, "round_medians_s": [r["median_s"] for r in ok], "round_peak_rss_gb": [r["peak_rss_gb"] for r in ok]}


def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}{unit}"


def markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Training step: peft vs deltatune speed and memory modes",
        "",
        f"SmolLM2-135M, batch {BATCH}x{SEQ} random tokens, LoRA r=16 alpha=32 all-linear, {meta['threads']} torch "
        "threads, each configuration in a fresh process. step s = median wall-clock seconds of the timed steps "
        "(n = timed steps after warmup), best of the interleaved rounds; cpu s = process CPU seconds per step "
        "(less sensitive to other load). bf16 = `torch.autocast(\"cpu\", dtype=torch.bfloat16)`. Ratios are "
        "against peft at the same precision (< 1: faster / smaller). loss0 = loss of the first step, before any "
        "update (the same for every setup of one precision: a correctness check). load = 1-min load average when "
        "the row finished (2 cores: above 2 means other work shared the machine).",
        "",
        "| config | precision | step s | cpu s | peak RSS GB | step vs peft | RSS vs peft | n | loss0 | load | what |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        setup, _, precision = name.partition("/")
        what = SETUPS[setup].what if setup in SETUPS else ""
        if "error" in r:
            lines.append(f"| {setup} | {precision} | failed: {r['error']} | | | | | | | | {what} |")
            continue
        peft = results.get(f"peft/{precision}", {})
        step_ratio = r["median_s"] / peft["median_s"] if "median_s" in peft else None
        rss_ratio = r["peak_rss_gb"] / peft["peak_rss_gb"] if "peak_rss_gb" in peft else None
        cpu = statistics.median(r["cpu_s"]) if r.get("cpu_s") else None
        compile_note = f" (compile {r['compile_s']:.0f} s, excluded)" if r.get("compile_s") else ""
        load = f"{r['load_avg'][0]:.1f}" if r.get("load_avg") else ""
        lines.append(f"| {setup} | {precision} | {_fmt(r['median_s'])} | {_fmt(cpu)} | {_fmt(r['peak_rss_gb'])} | "
                     f"{_fmt(step_ratio, 'x')} | {_fmt(rss_ratio, 'x')} | {r.get('steps', '')} | {r['loss_step0']:.4f} | "
                     f"{load} | {what}{compile_note} |")
    lines += ["", "## Where the time goes (seconds, instrumented steps after the timed ones)", "",
              "forward = decoder to the last hidden state; loss = head + cross-entropy forward (the chunked loss also "
              "computes its gradient here); loss backward = until the gradient reaches the last hidden state; "
              "backward = the decoder's; optimizer = step + zero_grad.", "",
              "| config | precision | forward | loss | loss backward | backward | optimizer | sum |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        b = r.get("breakdown_s")
        if b:
            setup, _, precision = name.partition("/")
            cells = " | ".join(_fmt(b[k]) for k in ("forward", "loss", "loss_backward", "backward", "optimizer"))
            lines.append(f"| {setup} | {precision} | {cells} | {_fmt(sum(b.values()))} |")
    lines += ["", f"> {REFERENCE_NOTE}", "",
              f"Machine: {meta['cpu']}, {meta['cores']} cores; torch {meta['torch']}, transformers "
              f"{meta['transformers']}, peft {meta['peft']}."]
    return "\n".join(lines) + "\n"


def meta_load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def drive(args) -> None:
    import peft
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    configs = args.only.split(",") if args.only else DEFAULT_CONFIGS
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "reference": REFERENCE_NOTE,
            "load_start": meta_load()}
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for i, name in enumerate(configs, 1):
            res = spawn(name, args)
            runs[name].append(res)
            shown = res.get("error") or (f"median {res['median_s']:.3f} s, peak RSS {res['peak_rss_gb']:.2f} GB, "
                                         f"loss0 {res['loss_step0']:.4f}")
            print(f"[round {round_ + 1}, {i}/{len(configs)}] {name}: {shown} ({res['process_wall_s']:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            if "error" in res:
                print(res["stderr_tail"], file=sys.stderr)
    fresh = {name: best_of(r) for name, r in runs.items()}
    meta["total_wall_s"] = time.perf_counter() - start
    meta["load_end"] = meta_load()
    # One table holds one run on one machine: rows of earlier runs are never mixed in (they measured other load,
    # often another CPU). A run writes train.json/train.md, or --name's files, e.g. train-epyc.md.
    results = {name: fresh[name] for name in [*DEFAULT_CONFIGS, *sorted(set(fresh) - set(DEFAULT_CONFIGS))] if name in fresh}
    stored = RESULTS / f"{args.name}.json"
    stored.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = markdown(results, meta)
    (RESULTS / f"{args.name}.md").write_text(table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help="run one configuration SETUP/PRECISION here and print a RESULT json line")
    parser.add_argument("--only", help="comma-separated configurations (default: every SETUP x PRECISION)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, at least 1 (default 1)")
    parser.add_argument("--breakdown", type=int, default=2, help="instrumented steps after the timed ones (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over all configurations (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--name", default="train", help="results file stem under bench/results (default: train)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1 or args.breakdown < 0:
        parser.error("--steps, --warmup and --rounds must be >= 1 and --breakdown >= 0")
    if args.one:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps({"config": args.one, **run_one(args.one, args)}), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
