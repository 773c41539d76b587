"""Training-step benchmark on the embedded SmolLM2-135M: peft + transformers against deltatune's speed and memory modes.

    python bench/bench_train.py                        # every configuration, ~20 min on 2 idle cores
    python bench/bench_train.py --only peft/bf16,speed/bf16 --steps 2
    python bench/bench_train.py --one speed/bf16       # one configuration here; prints a RESULT json line

    python bench/bench_train.py --workload sft --name train_sft   # SFT rows: prompts masked, packed
    python bench/bench_train.py --threads 1 ...        # on busy cores (2 spin-waiting threads: 6x slower steps)
    python bench/bench_train.py --one speed/bf16 --workload sft --threads 1 --profile 20   # where the step goes

Workloads (`--workload`): random = batch 4x256 random token ids, every next token labelled; sft = the demo
task's chat records tokenized at its max_length (96) with the prompt masked, packed into rows of 256, the
loop's first batch of 4 rows (the labelled fraction is in the table). LoRA r=16 alpha=32 all-linear,
`torch.set_num_threads(2)`. Every configuration runs in a fresh subprocess (peak RSS, allocator state and
one-time costs never leak between them) with the same environment, so allocator and OpenMP settings
(MALLOC_*, GLIBC_TUNABLES, OMP_WAIT_POLICY, recorded in the table) reach peft's rows as ours; `--rounds N`
interleaves N passes over all configurations and keeps each one's best median, which is the fairest number
when other work shares the machine. Step time: median of `--steps` steps after `--warmup`. Peak RSS:
ru_maxrss of that process (model loading included). Hooks on the timed steps split each into forward
(decoder), loss (head + cross-entropy forward), loss backward (until the gradient reaches the last hidden
state), backward (the decoder's) and optimizer (step + zero_grad). After the steps, each process counts its
step's matmul FLOPs and times those shapes as bare matmuls (bench/train_flops.py): the machine's limit.

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
WORKLOADS = ("random", "sft")
SFT_MAX_LENGTH = 96  # the demo's data.max_length
RESULT_PREFIX = "RESULT "
# process settings that reach every configuration alike (peft's rows included), recorded with the table
PROCESS_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_",
               "GLIBC_TUNABLES", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_PRELOAD")
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
    trim: bool = False  # memory.release_freed_heap() (glibc malloc_trim) between the forward and the backward
    # HF gradient checkpointing, non-reentrant: "full", "selective" (memory.py's policy), "half" (every 2nd layer),
    # "attention" (selective keeping attention's outputs only), "attention+down" (and the matmuls of reduction
    # dimension > hidden size: down_proj's), "narrow" (selective without the MLP's gate/up outputs, N > hidden size)
    checkpointing: str = ""
    attention: str = ""  # "": the model's SDPA; "eager": transformers' eager attention (matmul, fp32 softmax,
    # matmul); "auto": as `deltatune train` (attention: auto): deltatune.train.attention, each packed example's
    # causal block, on the packed sft workload, SDPA on the random one

    def recomputed(self) -> float:
        """Share of the decoder's forward matmuls the backward runs again (selective: only LoRA's B(A x), ~0;
        attention+down: all but down_proj's, 4608 of 6144 FLOPs per token for SmolLM2)."""
        return {"": 0.0, "full": 1.0, "half": 0.5, "selective": 0.0, "attention": 1.0,
                "attention+down": 0.75, "narrow": 0.5}[self.checkpointing]


SETUPS: dict[str, Setup] = {
    "peft": Setup("peft + transformers: model(**batch).loss (full logits); torch's default AdamW", lib="peft"),
    "deltatune-hf": Setup("deltatune LoRA layers with peft's step (same HF loss and AdamW)"),
    "speed": Setup("speed mode: chunked fused loss + fused AdamW (+ bf16 frozen base weights under bf16; attention "
                   "per packed example on packed rows)", loss="chunked", base_bf16=True, fused=True, attention="auto"),
    "speed+sdpa": Setup("speed mode with SDPA over the masked row (attention: sdpa)", loss="chunked",
                        base_bf16=True, fused=True),
    "speed+eager": Setup("speed mode with transformers' eager attention instead of SDPA's CPU flash kernel",
                         loss="chunked", base_bf16=True, fused=True, attention="eager"),
    "speed+compile": Setup("speed mode + torch.compile of each decoder layer", loss="chunked", base_bf16=True,
                           fused=True, compile=True, attention="auto"),
    "memory": Setup("memory mode: speed mode + gradient checkpointing", loss="chunked", base_bf16=True, fused=True,
                    checkpointing="full", attention="auto"),
    "memory-selective": Setup("speed mode + selective checkpointing (matmul and attention outputs kept, the rest "
                              "recomputed)", loss="chunked", base_bf16=True, fused=True, checkpointing="selective",
                              attention="auto"),
    "peft+trim": Setup("peft's step + malloc_trim(0) between forward and backward", lib="peft", trim=True),
    "memory+trim": Setup("memory mode + malloc_trim(0) between forward and backward", loss="chunked", base_bf16=True,
                         fused=True, checkpointing="full", trim=True, attention="auto"),
    "memory-selective+trim": Setup("selective checkpointing + malloc_trim(0) between forward and backward",
                                   loss="chunked", base_bf16=True, fused=True, checkpointing="selective", trim=True,
                                   attention="auto"),
    "memory-attn": Setup("checkpointing that keeps attention's outputs only (the rest recomputed)", loss="chunked",
                         base_bf16=True, fused=True, checkpointing="attention", attention="auto"),
    "memory-attn-down": Setup("checkpointing that keeps attention's and down_proj's outputs", loss="chunked",
                              base_bf16=True, fused=True, checkpointing="attention+down", attention="auto"),
    "memory-narrow": Setup("selective checkpointing that recomputes the MLP's gate and up projections too",
                           loss="chunked", base_bf16=True, fused=True, checkpointing="narrow", attention="auto"),
    "memory-half": Setup("speed mode + gradient checkpointing of every 2nd layer", loss="chunked", base_bf16=True,
                         fused=True, checkpointing="half", attention="auto"),
    # ablations, run with --only
    "chunked": Setup("peft's step with deltatune layers and the chunked loss only", loss="chunked"),
    "chunked1024": Setup("as chunked, 1024-token chunks", loss="chunked", chunk=1024),
    "bf16base": Setup("peft's step with deltatune layers and bf16 frozen base weights only", base_bf16=True),
}
DEFAULT_CONFIGS = [f"{s}/{p}" for p in PRECISIONS for s in ("peft", "deltatune-hf", "speed", "memory")]


# ---- one configuration, in its own process ---------------------------------------------------------------
def load_base_and_tokenizer() -> tuple[nn.Module, object, str]:
    """(the embedded SmolLM2 in fp32, its tokenizer, which loader)."""
    from deltatune.models import load_model

    model, tokenizer = load_model(dtype=torch.float32)
    return model.eval(), tokenizer, "deltatune.models.load_model"


def load_base() -> tuple[nn.Module, str]:
    """(the embedded SmolLM2 in fp32, which loader): what bench_dora.py shares."""
    model, _, loader = load_base_and_tokenizer()
    return model, loader


def make_batch(workload: str, tokenizer, vocab_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The step's batch and what it holds. random: BATCH x SEQ random ids, every next token labelled. sft: the
    demo task's chat records tokenized as `deltatune train` does at the demo's max_length (96, prompt tokens
    masked with -100), packed into rows of SEQ tokens (position_ids restart per example, no attention mask), and
    the loop's first batch of BATCH rows (seed 0)."""
    if workload == "random":
        ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "labels": ids}, {"workload": workload, "labelled_fraction": 1.0}
    from deltatune.data import batch_order, collate, load_records, pack, tokenize
    from deltatune.demo import data_path

    examples, _ = tokenize(load_records(data_path("train")), tokenizer, format="messages", max_length=SFT_MAX_LENGTH)
    rows = pack(examples, SEQ)
    first = batch_order([len(r["input_ids"]) for r in rows], BATCH, group_by_length=False, seed=0, epoch=0)[0]
    batch = collate([rows[i] for i in first], tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    positions = batch["labels"].numel() - batch["labels"].shape[0]  # predicting positions: B·(T-1)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    starts = (batch["position_ids"][:, 1:] != batch["position_ids"][:, :-1] + 1).sum() + batch["labels"].shape[0]
    return batch, {"workload": workload, "shape": list(batch["input_ids"].shape), "labelled_tokens": labelled,
                   "labelled_fraction": labelled / positions, "segments": int(starts),
                   "real_tokens": sum(len(rows[i]["input_ids"]) for i in first)}


def build(setup: Setup, precision: str, workload: str):
    """(model with LoRA, its HF causal-LM module, optimizer, info) for one setup."""
    model, tokenizer, loader = load_base_and_tokenizer()
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
    if setup.attention == "auto" and workload == "sft":  # deltatune.train.attention: each packed example's block
        from deltatune.train.attention import register

        hf.set_attn_implementation(register())
    elif setup.attention not in ("", "auto"):
        hf.set_attn_implementation(setup.attention)
    if setup.checkpointing:
        from deltatune.train.memory import selective_checkpointing_context

        kwargs: dict = {"use_reentrant": False}
        if setup.checkpointing == "selective":
            kwargs["context_fn"] = selective_checkpointing_context()
        elif setup.checkpointing.startswith("attention"):
            keep_above = hf.config.hidden_size if setup.checkpointing == "attention+down" else float("inf")
            kwargs["context_fn"] = selective_checkpointing_context(keep_above)
        elif setup.checkpointing == "narrow":
            kwargs["context_fn"] = selective_checkpointing_context(max_width=hf.config.hidden_size)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                           every_n_layers=2 if setup.checkpointing == "half" else 1)
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
    info["peak_rss_after_build_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return model, hf, optimizer, tokenizer, info


def precision_context(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def make_step(setup: Setup, precision: str, model, hf, optimizer, batch) -> Callable[[bool], dict]:
    """One optimizer step through the public API, as a training loop would run it, timed by phase.

    The phases come from hooks on these very steps (no second, instrumented code path): the decoder's forward
    hook marks the end of the forward and hooks its output, whose gradient marks the end of the loss backward.
    forward = decoder to the last hidden state; loss = head + cross-entropy forward (the chunked loss also
    computes its gradient here); loss backward = until the gradient reaches the last hidden state; backward =
    the decoder's; optimizer = step + zero_grad.
    """
    from deltatune.train.loss import causal_lm_loss
    from deltatune.train.memory import release_freed_heap

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    marks: dict[str, float] = {}

    def now() -> tuple[float, float]:  # (wall, process CPU) seconds
        return time.perf_counter(), time.process_time()

    def decoder_done(_module, _args, output) -> None:
        marks["forward"] = now()
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: marks.setdefault("at_hidden", now()) and None)

    hf.model.register_forward_hook(decoder_done)

    def step(first: bool = False) -> dict:
        marks.clear()
        t0 = now()
        with precision_context(precision):
            if setup.loss == "hf":
                loss = model(**inputs, labels=batch["labels"], use_cache=False).loss
            else:
                total, tokens = causal_lm_loss(hf, batch, setup.chunk)
                loss = total / tokens
        if setup.trim:
            release_freed_heap()
        t2 = now()
        loss.backward()
        t3 = now()
        out = {"loss": loss.item()}
        if first:  # before any update: the same for every setup of one precision (B = 0)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            out["grad_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        t3b = now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = now()
        t1, at_hidden = marks.get("forward", t0), marks.get("at_hidden", t2)
        for clock, key in ((0, "phases"), (1, "cpu_phases")):
            out[key] = {"forward": t1[clock] - t0[clock], "loss": t2[clock] - t1[clock],
                        "loss_backward": at_hidden[clock] - t2[clock], "backward": t3[clock] - at_hidden[clock],
                        "optimizer": t4[clock] - t3b[clock]}
        out["seconds"] = (t3[0] - t0[0]) + (t4[0] - t3b[0])
        return out

    return step


def run_one(name: str, args) -> dict:
    setup_name, _, precision = name.partition("/")
    if setup_name not in SETUPS or precision not in PRECISIONS:
        raise SystemExit(f"--one {name!r}: use SETUP/PRECISION with SETUP in {', '.join(SETUPS)} and PRECISION in {PRECISIONS}")
    setup = SETUPS[setup_name]
    torch.manual_seed(0)
    model, hf, optimizer, tokenizer, info = build(setup, precision, args.workload)
    batch, info["batch"] = make_batch(args.workload, tokenizer, hf.config.vocab_size)
    step = make_step(setup, precision, model, hf, optimizer, batch)
    start = time.perf_counter()
    first = step(first=True)
    first_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times, cpu, faults, losses, phases, cpu_phases = [], [], [], [first["loss"]], [], []
    for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        out = step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        losses.append(out["loss"])
        times.append(out["seconds"])
        phases.append(out["phases"])
        cpu_phases.append(out["cpu_phases"])
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    median = statistics.median(times)
    result = {
        "steps": args.steps, "warmup": args.warmup,
        **info, "setup": dataclasses.asdict(setup), "precision": precision, "times": times, "median_s": median, "min_s": min(times), "cpu_s": cpu,
        "first_step_s": first_s, "compile_s": max(0.0, first_s - median) if setup.compile else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "minor_faults_per_step": statistics.median(faults), "loss_step0": first["loss"], "grad_norm_step0": first["grad_norm"],
        "losses": losses, "breakdown_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "cpu_breakdown_s": {k: statistics.median(p[k] for p in cpu_phases) for k in cpu_phases[0]},
    }
    if args.limit:
        result["flops"] = step_flops(setup, precision, hf.config, batch, median)
    if args.profile:
        result["profile"] = profile_step(step, args.profile)
    return result


def profile_step(step: Callable[[bool], dict], top: int) -> list[dict]:
    """One more step under torch.profiler: the `top` aten ops by self CPU time, each with its share of the
    profiled step (what the project's 2% rule is judged by), printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    print(f"profiled step: {total / 1e6:.2f} s self CPU", file=sys.stderr)
    for r in rows:
        print(f"  {r['op'][:58]:58s} {r['calls']:6d} calls {r['self_cpu_ms']:9.1f} ms {100 * r['share']:5.1f}%", file=sys.stderr)
    return rows


def step_flops(setup: Setup, precision: str, config, batch: dict, step_s: float) -> dict:
    """The step's counted FLOPs per part, and the time its matmuls take at the rate this machine reaches on
    their shapes (measured here, after the steps: the same process, threads and dtype)."""
    from deltatune.train.loss import auto_chunk_size

    from train_flops import StepShape, flops, matmul_limit, step_matmuls

    rows, length = batch["input_ids"].shape
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    head_rows = rows * length if setup.loss == "hf" else labelled
    examples: tuple[int, ...] = ()
    if setup.attention == "auto" and "position_ids" in batch:  # attention per packed example: its blocks only
        from deltatune.train.attention import _starts

        examples = tuple(e - s for row in _starts(batch["position_ids"]) for s, e in zip(row, row[1:]))
    shape = StepShape.of(config, rows, length, head_rows, LORA["r"], setup.recomputed(), examples)
    parts = step_matmuls(shape)
    counted = flops(parts)
    chunk = 0 if setup.loss == "hf" else (setup.chunk or auto_chunk_size(config.vocab_size, torch.device("cpu")))
    limit = matmul_limit(parts, torch.bfloat16 if precision == "bf16" else torch.float32, chunk)
    total, limit_s = sum(counted.values()), sum(limit.values())
    return {"gflop": {k: v / 1e9 for k, v in counted.items()}, "limit_s": limit, "total_gflop": total / 1e9,
            "step_gflops": total / step_s / 1e9, "limit_gflops": total / limit_s / 1e9, "of_limit": limit_s / step_s}


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


# ---- the driver -------------------------------------------------------------------------------------------
def spawn(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--workload", args.workload,
           *(["--no-limit"] if not args.limit else [])]
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
        f"SmolLM2-135M, {workload_line(meta)}, LoRA r=16 alpha=32 all-linear, {meta['threads']} torch "
        "threads, each configuration in a fresh process. step s = median wall-clock seconds of the timed steps "
        "(n = timed steps after warmup), best of the interleaved rounds; cpu s = process CPU seconds per step "
        "(less sensitive to other load). bf16 = `torch.autocast(\"cpu\", dtype=torch.bfloat16)`. Ratios are "
        "against peft at the same precision (< 1: faster / smaller). loss0 = loss of the first step, before any "
        "update (the same for every setup of one precision: a correctness check). load = 1-min load average when "
        "the row finished (2 cores: above 2 means other work shared the machine).",
        "",
        "| config | precision | step s | cpu s | peak RSS GB | step vs peft | cpu vs peft | RSS vs peft | n | loss0 | load | what |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        setup, _, precision = name.partition("/")
        what = SETUPS[setup].what if setup in SETUPS else ""
        if "error" in r:
            lines.append(f"| {setup} | {precision} | failed: {r['error']} | | | | | | | | | {what} |")
            continue
        peft = results.get(f"peft/{precision}", {})
        step_ratio = r["median_s"] / peft["median_s"] if "median_s" in peft else None
        rss_ratio = r["peak_rss_gb"] / peft["peak_rss_gb"] if "peak_rss_gb" in peft else None
        cpu = statistics.median(r["cpu_s"]) if r.get("cpu_s") else None
        cpu_ratio = cpu / statistics.median(peft["cpu_s"]) if cpu and peft.get("cpu_s") else None
        compile_note = f" (compile {r['compile_s']:.0f} s, excluded)" if r.get("compile_s") else ""
        load = f"{r['load_avg'][0]:.1f}" if r.get("load_avg") else ""
        lines.append(f"| {setup} | {precision} | {_fmt(r['median_s'])} | {_fmt(cpu)} | {_fmt(r['peak_rss_gb'])} | "
                     f"{_fmt(step_ratio, 'x')} | {_fmt(cpu_ratio, 'x')} | {_fmt(rss_ratio, 'x')} | {r.get('steps', '')} | {r['loss_step0']:.4f} | "
                     f"{load} | {what}{compile_note} |")
    lines += ["", "## Where the time goes (seconds, medians over the timed steps)", "",
              "Hooks on the timed steps themselves: forward = decoder to the last hidden state; loss = head + "
              "cross-entropy forward (the chunked loss also computes its gradient here); loss backward = until the "
              "gradient reaches the last hidden state; backward = the decoder's; optimizer = step + zero_grad.", "",
              "Each cell: wall s / process CPU s (CPU seconds are what a loaded machine inflates least).", "",
              "| config | precision | forward | loss | loss backward | backward | optimizer | sum |",
              "|---|---|---|---|---|---|---|---|"]
    keys = ("forward", "loss", "loss_backward", "backward", "optimizer")
    for name, r in results.items():
        setup, _, precision = name.partition("/")
        b, c = r.get("breakdown_s"), r.get("cpu_breakdown_s") or {}
        if not b:
            lines.append(f"| {setup} | {precision} | no breakdown: {r.get('error', 'not recorded')} | | | | | |")
            continue
        cells = " | ".join(f"{_fmt(b[k])} / {_fmt(c.get(k))}" for k in keys)
        lines.append(f"| {setup} | {precision} | {cells} | {_fmt(sum(b.values()))} / {_fmt(sum(c.values()) if c else None)} |")
    lines += flops_table(results)
    lines += ["", f"> {REFERENCE_NOTE}", "",
              f"Machine: {meta['cpu']} ({meta.get('flags', cpu_flags())}), {meta['cores']} cores, load "
              f"{meta['load_start']} at the start, {meta.get('load_end', '?')} at the end; {meta.get('env', '')} torch {meta['torch']}, transformers "
              f"{meta['transformers']}, peft {meta['peft']}."]
    return "\n".join(lines) + "\n"


def workload_line(meta: dict) -> str:
    b = meta.get("batch") or {}
    if b.get("workload") != "sft":
        return f"batch {BATCH}x{SEQ} random tokens, every next token labelled"
    return (f"SFT batch {b['shape'][0]}x{b['shape'][1]}: the demo's chat records tokenized at max_length "
            f"{SFT_MAX_LENGTH}, prompts masked, packed ({b['segments']} segments, {b['real_tokens']} real tokens), "
            f"{b['labelled_tokens']} labelled tokens = {100 * b['labelled_fraction']:.1f}% of the predicting positions")


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "flags unknown"
    return (f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"amx {'yes' if 'amx_bf16' in flags or 'amx_tile' in flags else 'no'}")


def flops_table(results: dict) -> list[str]:
    """Counted GFLOP per part, the step's rate, and the share of this machine's matmul limit it reaches."""
    rows = [(name, r["flops"], r) for name, r in results.items() if r.get("flops")]
    if not rows:
        return []
    parts = list(rows[0][1]["gflop"])  # of limit, CPU s: the limit / the step's process CPU seconds
    lines = ["", "## Against the machine: counted FLOPs and this CPU's matmul rate on the same shapes", "",
             "GFLOP per step by part (matmuls only: frozen linears forward + input gradient, LoRA forward + both "
             "gradients, attention, head; bench/train_flops.py). limit = the rate those matmuls reach as bare "
             "`torch.mm` on their shapes, dtype and threads, timed in the same process after the steps; of limit "
             "= the step time at that rate / the measured step time.", "",
             "| config | precision | " + " | ".join(parts) + " | total GFLOP | step GFLOP/s | limit GFLOP/s | of limit "
             "| of limit, CPU s |",
             "|---|---|" + "---:|" * (len(parts) + 5)]
    for name, f, r in rows:
        setup, _, precision = name.partition("/")
        cells = " | ".join(f"{f['gflop'].get(p, 0):.0f}" for p in parts)
        of_cpu = sum(f["limit_s"].values()) / statistics.median(r["cpu_s"]) if r.get("cpu_s") else None
        lines.append(f"| {setup} | {precision} | {cells} | {f['total_gflop']:.0f} | {f['step_gflops']:.0f} | "
                     f"{f['limit_gflops']:.0f} | {100 * f['of_limit']:.0f}% | "
                     f"{'—' if of_cpu is None else f'{100 * of_cpu:.0f}%'} |")
    return lines


def meta_load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def drive(args) -> None:
    import peft
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    configs = args.only.split(",") if args.only else DEFAULT_CONFIGS
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "reference": REFERENCE_NOTE, "flags": cpu_flags(),
            "workload": args.workload, "env": " ".join(f"{k}={os.environ[k]}" for k in PROCESS_ENV if k in os.environ),
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
    meta["batch"] = next((r["batch"] for r in fresh.values() if r.get("batch")), None)
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
    parser.add_argument("--workload", choices=WORKLOADS, default="random",
                        help="random: 4x256 random ids, all labelled; sft: the demo's records, prompts masked, packed")
    parser.add_argument("--no-limit", dest="limit", action="store_false",
                        help="skip counting FLOPs and timing the step's matmul shapes (the machine's limit)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="with --one: profile one more step and print its TOP ops by self CPU time")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over all configurations (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--name", default="train", help="results file stem under bench/results (default: train)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be >= 1")
    if args.one:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps({"config": args.one, **run_one(args.one, args)}), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
