"""VeRA, LoHa, LoKr and DyLoRA on the embedded SmolLM2, issue 15's "Measured" section (part B).

    flock /tmp/deltatune-bench.lock python bench/bench_lowrank_family.py --part step      # vs peft's same method
    flock /tmp/deltatune-bench.lock python bench/bench_lowrank_family.py --part quality   # event task, held-out
    flock /tmp/deltatune-bench.lock python bench/bench_lowrank_family.py --part serve     # decode step, fused kernels

step: one process per row, fp32, all-linear, batch 4 x 128, AdamW, median of 5 steps after 2, peak RSS of the
process, trainable parameters and the saved file's size; each method against peft's same method (DyLoRA, which
peft lacks, against peft's LoRA at the same r; its step includes the rank sampler's masked update).
quality: the task family's hard task (event, docs/tasks.md), the recipe of docs/tasks.md's sanity check (batch 8,
24 steps, cosine to 0.1); every row's lr chosen from its grid (QUALITY_RUNS) on the validation split (40) at the
first seed, then every seed at it; the held-out test split (50) scored once per run, never used to choose.
--reuse FILE... takes runs already in earlier results (same method, seed, lr and steps) instead of training them
again (the lowrank_quality_family3 table reuses lowrank_quality_val_seed0.json's 1e-3 runs).
AdaLoRA 12->8 ends at LoRA r=8's parameter budget. DyLoRA r=8 (frozen=False: the frozen mode scored 0% at every b
in 24 steps, lowrank_quality_seed0.md) is trained once and scored at b = 2, 4, 8 (loaded with overrides={"rank": b})
beside LoRA trained at r = 2, 4, 8.
serve: the serving engine's decode step (fp32, 16 requests of 64-token prompts, adapters on q_proj and v_proj
with random factors), median over steps taken in strict alternation between the rows (bench_serve.paired_decode,
so other processes' load falls on every row alike): the base, 4 LoRA r=8, 4 DyLoRA r=8 served at rank 4, 4 VeRA
r=256, all 12 mixed through the fused kernels (the low-rank view), and the same mix through the routed path.
Results: bench/results/lowrank_<part>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = Path(__file__).resolve().parents[1] / "deltatune" / "demo_data" / "tasks"
ALL = "all-linear"
VERA = {"peft_type": "VERA", "r": 256, "target_modules": ALL}
LOHA = {"peft_type": "LOHA", "r": 8, "alpha": 16, "target_modules": ALL}
LOKR = {"peft_type": "LOKR", "r": 8, "alpha": 16, "target_modules": ALL}
DYLORA = {"peft_type": "DYLORA", "r": 8, "lora_alpha": 16, "target_modules": ALL}


def lora(r: int) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ALL}


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


# ---- step time, peak RSS, parameters, file size: one process per row --------------------------------------
STEP_ROWS = {
    "deltatune VeRA r=256": ("deltatune", VERA), "peft VeRA r=256": ("peft", VERA),
    "deltatune LoHa r=8": ("deltatune", LOHA), "peft LoHa r=8": ("peft", LOHA),
    "deltatune LoKr r=8": ("deltatune", LOKR), "peft LoKr r=8": ("peft", LOKR),
    "deltatune DyLoRA r=8": ("deltatune", DYLORA), "peft LoRA r=8": ("peft", lora(8)),
    "deltatune LoRA r=8": ("deltatune", lora(8)),
}


def step_child(row: str) -> dict:
    import resource

    import torch

    from deltatune.models import load_model

    impl, adapter = STEP_ROWS[row]
    torch.manual_seed(0)
    model, _ = load_model()
    section = {k: v for k, v in adapter.items() if k != "peft_type"}
    hooks = []
    if impl == "peft":
        import peft

        cls = {"VERA": peft.VeraConfig, "LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig, "LORA": peft.LoraConfig}
        model = peft.get_peft_model(model, cls[adapter["peft_type"]](task_type="CAUSAL_LM", **section))
        save = lambda path: model.save_pretrained(path)  # noqa: E731
    else:
        import deltatune as dt
        from deltatune.core.registry import method_of
        from deltatune.train.hooks import step_hooks

        dt.attach(model, method_of(adapter["peft_type"]).config_cls(**section))
        hooks = step_hooks(model)
        save = lambda path: dt.save_adapter(model, path)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    model.train()
    times = []
    for step in range(1, 8):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        for hook in hooks:
            hook.before_step(model, optimizer, step)
        optimizer.step()
        for hook in hooks:
            hook.on_step(model, optimizer, step)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    return {"row": row, "step_s": round(statistics.median(times[2:]), 3), "peak_rss_gb": round(peak, 2),
            "trainable": sum(p.numel() for p in params), "file_bytes": size, "load": load()}


def step(only: list[str] | None = None, rounds: int = 1) -> list[dict]:
    """One process per row; with rounds > 1 the rows run in alternation that many times and each keeps its best
    (a burst of other load falls on one round, not on one row)."""
    rows: dict[str, dict] = {}
    for row in [r for _ in range(rounds) for r in (only or STEP_ROWS)]:
        out = subprocess.run([sys.executable, __file__, "--step-child", row], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if out.returncode or not line:
            raise RuntimeError(f"{row}: {out.stderr[-2000:]}")
        new = json.loads(line[-1])
        print(line[-1], flush=True)
        if row not in rows or new["step_s"] < rows[row]["step_s"]:
            rows[row] = new
    return list(rows.values())


# ---- held-out exact match on the event task ------------------------------------------------------------------
# each method's learning-rate grid, tried at the first seed and chosen on the validation split (40 records)
ADALORA = {"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "lora_alpha": 24, "tinit": 4, "tfinal": 6, "deltaT": 2,
           "target_modules": ALL}  # the final budget of LoRA r=8 (b0 = 1.5·bT, the paper's), s = 24/12 = LoRA's 16/8
QUALITY_RUNS = [  # (name, adapter, lr grid or another row's name, ranks scored: None = the trained one)
    ("LoRA r=8", lora(8), [1e-3], [None]), ("AdaLoRA 12->8", ADALORA, [1e-3, 3e-3, 1e-2], [None]),
    ("VeRA r=256", VERA, [3e-3, 1e-2, 3e-2], [None]),
    ("DyLoRA r=8 frozen=False", {**DYLORA, "frozen": False}, [1e-3, 3e-3], [2, 4, 8]),
    ("LoHa r=8", LOHA, [1e-3, 3e-3, 1e-2], [None]), ("LoKr r=8", LOKR, [1e-3, 3e-3, 1e-2], [None]),
    ("LoRA r=4", lora(4), [1e-3, 3e-3], [None]), ("LoRA r=2", lora(2), [1e-3, 3e-3], [None]),
    ("LoRA r=8, lr on validation", lora(8), [1e-3, 3e-3, 1e-2], [None])]  # beside AdaLoRA's chosen lr
# the added-module methods of issue 16 on the same task, at their recommended lr (fixed before measuring)
ADDED_RUNS = [
    ("Pfeiffer", {"peft_type": "PFEIFFER"}, [1e-3], [None]),
    ("parallel adapter (mlp)", {"peft_type": "PARALLEL_ADAPTER", "target_modules": ["mlp"]}, [1e-3], [None]),
    ("prefix tuning p=20", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}, [1e-2], [None]),
    ("P-tuning MLP p=20", {"peft_type": "P_TUNING", "num_virtual_tokens": 20}, [1e-3], [None])]


def quality(steps: int, seeds: list[int], only: list[str] | None = None, out: Path | None = None,
            fixed_lr: dict[str, float] | None = None, reuse: list[Path] = ()) -> list[dict]:
    """Each method's lr chosen on event.validation at seeds[0] (mean over the ranks it is scored at; a tie keeps
    the smaller lr), then every seed at that lr; event.test scored once per run and never used to choose. Rows
    of lrs not chosen are kept with "chosen": false. A run (method, seed, lr, steps) already in a --reuse file
    with its validation score is taken from there, marked "reused_from", instead of trained again."""
    from deltatune import load_adapter, trainable_parameters
    from deltatune.data import load_records
    from deltatune.models import load_model
    from deltatune.train.evaluate import eval_generation
    from deltatune.train.loop import train

    splits = {name: load_records(TASKS / f"event.{name}.jsonl") for name in ("validation", "test")}
    rows: list[dict] = []

    earlier = [{**r, "reused_from": path.name} for path in reuse for r in json.loads(path.read_text())["rows"]
               if r.get("validation") is not None]

    def run(name: str, adapter: dict, lr: float, ranks: list, seed: int) -> list[dict]:
        methods = [name + (f" at b={b}" if b else "") for b in ranks]
        found = {r["method"]: r for r in earlier if (r["seed"], r["lr"], r["steps"]) == (seed, lr, steps)}
        if all(m in found for m in methods):
            print(f"{name}, seed {seed}, lr {lr:g}: reused from {found[methods[0]]['reused_from']}", flush=True)
            return [{k: v for k, v in found[m].items() if k != "chosen"} for m in methods]
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = load_model()
            started = time.perf_counter()
            result = train(model=model, tokenizer=tokenizer, adapter=adapter, output_dir=tmp, log_every=steps,
                           data={"train": str(TASKS / "event.train.jsonl"), "max_length": 96}, batch_size=8,
                           max_steps=steps, seed=seed, precision="auto",
                           optim={"lr": lr, "warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1})
            train_s = time.perf_counter() - started
            trainable, _ = trainable_parameters(model)
            size = sum(f.stat().st_size for f in Path(result.adapter_dir).iterdir())
            out_rows = []
            for b in ranks:
                fresh, tokenizer = load_model()
                load_adapter(fresh, result.adapter_dir, overrides={"rank": b} if b else None)
                score = {split: eval_generation(fresh, tokenizer, records, max_new_tokens=48, match="exact",
                                                batch_size=len(records))["score"] for split, records in splits.items()}
                out_rows.append({"method": name + (f" at b={b}" if b else ""), "seed": seed, "steps": steps,
                                 "lr": lr, "validation": score["validation"], "exact": score["test"],
                                 "trainable": trainable, "file_bytes": size, "step_s": round(train_s / steps, 2),
                                 "last_train_loss": result.last_loss, "load": load()})
                print(json.dumps(out_rows[-1]), flush=True)
            return out_rows

    chosen_lr: dict[str, float] = {}
    selected = [r for r in QUALITY_RUNS + ADDED_RUNS if (r in QUALITY_RUNS if only is None else r[0] in only)]
    for seed in seeds:  # every method at the first seed, then the next seed: a cut-off run keeps whole seeds
        for name, adapter, grid, ranks in selected:
            if seed != seeds[0]:
                rows.extend({**r, "chosen": True} for r in run(name, adapter, chosen_lr[name], ranks, seed))
                continue
            if isinstance(grid, str):  # another row's validation-chosen lr (LoRA at lower ranks: LoRA r=8's)
                grid = [chosen_lr.get(grid, 1e-3)]
            if name in (fixed_lr or {}):  # chosen on validation in an earlier run (--lr NAME=LR)
                grid = [fixed_lr[name]]
            first = {lr: run(name, adapter, lr, ranks, seed) for lr in grid}
            chosen = chosen_lr[name] = max(grid, key=lambda lr: (statistics.mean(r["validation"] for r in first[lr]), -lr))
            for lr, lr_rows in first.items():
                rows.extend({**r, "chosen": lr == chosen} for r in lr_rows)
            if out is not None:  # written after every method: a cut-off run keeps what it measured
                out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        if out is not None:
            out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return rows


def serve(steps: int) -> list[dict]:
    import torch

    import deltatune as dt
    from bench_serve import paired_decode
    from deltatune.models import load_model

    model, tokenizer = load_model()
    qv = ["q_proj", "v_proj"]
    kinds = {"lora": dt.LoraConfig(r=8, lora_alpha=16, target_modules=qv, init_lora_weights=False),
             "dylora": dt.DyLoraConfig(r=8, lora_alpha=16, target_modules=qv, rank=4, init_lora_weights=False),
             "vera": dt.VeraConfig(r=256, target_modules=qv, init_weights=False)}
    names: dict[str, list[str]] = {}
    for kind, config in kinds.items():
        for i in range(4):
            name = f"{kind}{i}"
            torch.manual_seed(i)
            dt.attach(model, config, name, activate=False)
            with torch.no_grad():  # small random factors: a real change of every row, no overflow
                for key, t in dt.adapter_tensors(model, name).items():
                    if isinstance(t, torch.nn.Parameter):
                        t.normal_(0, 0.02 if kind != "vera" else 0.1)
            names.setdefault(kind, []).append(name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (64,), generator=g).tolist() for _ in range(16)]
    rows_of = lambda pool: [pool[i % len(pool)] for i in range(16)]  # noqa: E731
    mixed = rows_of(names["lora"] + names["dylora"] + names["vera"])
    configs = {"base": ([None] * 16, True), "4 LoRA r=8": (rows_of(names["lora"]), True),
               "4 DyLoRA r=8 at rank 4": (rows_of(names["dylora"]), True), "4 VeRA r=256": (rows_of(names["vera"]), True),
               "12 mixed, fused": (mixed, True), "12 mixed, routed": (mixed, False)}
    before = load()
    medians = paired_decode(model, tokenizer, prompts, configs, steps)
    return [{"row": label, "decode_step_s": round(t, 4), "vs_base": round(t / medians["base"], 3),
             "load_before": before, "load_after": load()} for label, t in medians.items()]


def table(part: str, rows: list[dict], cpu: str) -> str:
    head = (f"Measured on {cpu}, 2 cores shared with other jobs (load average per row in the .json), "
            f"bench/bench_lowrank_family.py --part {part}.\n\n")
    if part == "serve":
        lines = ["| row (16 requests) | decode step | vs base |", "|---|---:|---:|"]
        lines += [f"| {r['row']} | {r['decode_step_s'] * 1e3:.1f} ms | {r['vs_base']:.2f}x |" for r in rows]
        return head + "\n".join(lines) + f"\n\nload average before/after: {rows[0]['load_before']} / {rows[0]['load_after']}\n"
    if part == "step":
        lines = ["| row | step (fp32, 4x128) | peak RSS | trainable | file | load |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['row']} | {r['step_s']:.2f} s | {r['peak_rss_gb']:.2f} GB | {r['trainable']:,} | "
                  f"{r['file_bytes'] / 1e6:.2f} MB | {r['load']} |" for r in rows]
        return head + "\n".join(lines) + "\n"
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"| method | steps | lr (validation at seed {seeds[0]}: lr: exact) | held-out exact (event test, 50): "
             f"mean [min, max] over {len(seeds)} seeds | trainable | file | step |", "|---|---:|---|---|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get("chosen", True)]
        tried = {r["lr"]: r.get("validation") for r in rows if r["method"] == method and r["seed"] == seeds[0]}
        grid = ", ".join(f"{lr:g}: {v:.0%}" if v is not None else f"{lr:g}" for lr, v in tried.items())
        values = [r["exact"] for r in mine]
        lines.append(f"| {method} | {mine[0]['steps']} | {mine[0]['lr']:g} ({grid}) | {statistics.mean(values):.0%} "
                     f"[{min(values):.0%}, {max(values):.0%}] | {mine[0]['trainable']:,} | "
                     f"{mine[0]['file_bytes'] / 1e6:.2f} MB | {statistics.median(r['step_s'] for r in mine):.2f} s |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "step", "serve"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--step-child", default=None)
    parser.add_argument("--rows", nargs="+", default=None, help="step/quality: only these rows (step: STEP_ROWS "
                        "names; quality: method names such as 'DyLoRA r=8')")
    parser.add_argument("--rounds", type=int, default=1, help="step: rounds in alternation, best of each row")
    parser.add_argument("--name", default=None, help="results file name (default: lowrank_<part>)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="NAME=LR", help="quality: a row's lr, chosen on "
                        "validation by an earlier run (its seeds then continue at it)")
    parser.add_argument("--reuse", nargs="+", default=[], metavar="FILE", help="quality: earlier results files "
                        "(bench/results/*.json) whose runs at the same method, seed, lr and steps are not trained again")
    args = parser.parse_args()
    if args.step_child:
        print(json.dumps(step_child(args.step_child)), flush=True)
        return
    from _common import cpu_name

    rows = {"step": lambda: step(args.rows, args.rounds), "quality": lambda: quality(args.steps, args.seeds, args.rows, RESULTS / f"{args.name or 'lowrank_quality'}.partial.json",
                                  {k: float(v) for k, _, v in (x.rpartition("=") for x in args.lr)},
                                  [Path(f) for f in args.reuse]), "serve": lambda: serve(args.steps)}[args.part]()
    RESULTS.mkdir(exist_ok=True)
    name = args.name or f"lowrank_{args.part}"
    (RESULTS / f"{name}.json").write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2) + "\n")
    text = table(args.part, rows, cpu_name())
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
