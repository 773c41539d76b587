"""AdaLoRA and ReLoRA against LoRA (and peft) on the embedded SmolLM2, issue 15's "Measured" section.

    flock /tmp/deltatune-bench.lock python bench/bench_adalora_relora.py --part quality   # event task, 3 seeds
    flock /tmp/deltatune-bench.lock python bench/bench_adalora_relora.py --part cpt       # continued pretraining
    flock /tmp/deltatune-bench.lock python bench/bench_adalora_relora.py --part step      # step time, peak RSS vs peft

quality: the task family's hard task (event), LoRA r=8 all-linear against AdaLoRA at the same final budget
(init_r 12 -> target_r 8 per layer on average, the paper's b0 = 1.5·bT), same steps, batch, lr and schedule
(fixed before measuring, not tuned: the sanity check's recipe in docs/tasks.md), held-out test exact match
scored once per seed. cpt: `text` records built from the five source tasks' sentences and answers, ReLoRA
r=8 with restarts against plain LoRA r=8 at the same steps and lr, held-out text loss (the test splits).
step: one process per row, fp32, batch 4 x 128, median of 5 steps after 2, peak RSS of the process.
Results: bench/results/adalora_relora_<part>.json and .md, with the CPU and the load average.
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
SEEDS = (0, 1, 2)
LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
ADALORA = {"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "lora_alpha": 24, "tinit": 4, "tfinal": 6,
           "deltaT": 2, "target_modules": "all-linear"}  # s = 24/12 = LoRA's 16/8
RELORA = {"peft_type": "RELORA", "r": 8, "lora_alpha": 16, "relora_steps": 10, "restart_warmup_steps": 2,
          "target_modules": "all-linear"}


def load() -> str:
    return os.getloadavg().__repr__()


def common(out: Path, steps: int, seed: int) -> dict:
    return {"batch_size": 8, "max_steps": steps, "seed": seed, "precision": "auto", "output_dir": str(out),
            "log_every": steps, "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1}}


def quality(steps: int) -> list[dict]:
    from deltatune import load_adapter, trainable_parameters
    from deltatune.data import load_records
    from deltatune.models import load_model
    from deltatune.train.evaluate import eval_generation
    from deltatune.train.loop import train

    test = load_records(TASKS / "event.test.jsonl")
    rows = []
    for name, adapter in (("LoRA r=8", LORA), ("AdaLoRA 12->8", ADALORA)):
        for seed in SEEDS:
            with tempfile.TemporaryDirectory() as tmp:
                model, tokenizer = load_model()
                started = time.perf_counter()
                result = train(model=model, tokenizer=tokenizer, adapter=adapter,
                               data={"train": str(TASKS / "event.train.jsonl"), "max_length": 96}, **common(Path(tmp), steps, seed))
                train_s = time.perf_counter() - started
                trainable, _ = trainable_parameters(model)
                size = sum(f.stat().st_size for f in Path(result.adapter_dir).iterdir())
                fresh, tokenizer = load_model()
                load_adapter(fresh, result.adapter_dir)
                exact = eval_generation(fresh, tokenizer, test, max_new_tokens=48, match="exact", batch_size=25)["score"]
            row = {"method": name, "seed": seed, "steps": steps, "exact": exact, "trainable": trainable,
                   "file_bytes": size, "step_s": round(train_s / steps, 2), "load": load()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def cpt_records(split: str) -> list[dict]:
    out = []
    for task in ("person", "order", "contact", "person_csv", "event"):
        for line in (TASKS / f"{task}.{split}.jsonl").read_text().splitlines():
            messages = json.loads(line)["messages"]
            user = next(m["content"] for m in messages if m["role"] == "user")
            out.append({"text": f"{user} {messages[-1]['content']}"})
    return out


def cpt(steps: int) -> list[dict]:
    from deltatune.models import load_model
    from deltatune.train.loop import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "test"):
            Path(tmp, f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cpt_records(split)))
        for name, adapter in (("LoRA r=8", LORA), (f"ReLoRA r=8, every {RELORA['relora_steps']}", RELORA)):
            for seed in SEEDS:
                model, tokenizer = load_model()
                result = train(model=model, tokenizer=tokenizer, adapter=adapter,
                               data={"train": f"{tmp}/train.jsonl", "eval": f"{tmp}/test.jsonl", "max_length": 96},
                               **common(Path(tmp) / f"{name[:6]}-{seed}", steps, seed))
                row = {"method": name, "seed": seed, "steps": steps, "eval_loss": result.eval["eval_loss"],
                       "last_train_loss": result.last_loss, "load": load()}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# ---- step time and peak RSS, one process per row ----------------------------------------------------------
STEP_ROWS = {
    "deltatune AdaLoRA": ("deltatune", ADALORA), "peft AdaLoRA": ("peft", ADALORA),
    "deltatune ReLoRA r=8": ("deltatune", RELORA), "peft LoRA r=8": ("peft", LORA), "deltatune LoRA r=8": ("deltatune", LORA),
}


def step_child(row: str) -> dict:
    import resource

    import torch

    from deltatune.models import load_model

    impl, adapter = STEP_ROWS[row]
    torch.manual_seed(0)
    model, _ = load_model()
    total = 7
    section = {k: v for k, v in adapter.items() if k != "peft_type"}
    if adapter["peft_type"] == "ADALORA":  # a schedule that fits 7 steps: masks from step 2 on, every step
        section.update(tinit=1, tfinal=1, deltaT=1)
    if adapter["peft_type"] == "RELORA":  # restarts after steps 3 and 6 (one of them timed)
        section.update(relora_steps=3, restart_warmup_steps=1)
    hook = None
    if impl == "peft":
        import peft

        cls = peft.AdaLoraConfig if adapter["peft_type"] == "ADALORA" else peft.LoraConfig
        extra = {"total_step": total} if adapter["peft_type"] == "ADALORA" else {}
        model = peft.get_peft_model(model, cls(task_type="CAUSAL_LM", **{**section, "target_modules": "all-linear"}, **extra))
        forward = lambda ids: model(input_ids=ids, labels=ids).loss  # peft adds AdaLoRA's penalty here
        after = (lambda step: model.base_model.update_and_allocate(step)) if adapter["peft_type"] == "ADALORA" else None
    else:
        import deltatune as dt
        from deltatune.core.registry import method_of
        from deltatune.train.hooks import step_hooks

        config = method_of(adapter["peft_type"]).config_cls(**section)
        fit = method_of(config).fit_run
        config = fit(config, total) if fit else config
        dt.attach(model, config)
        hooks = step_hooks(model)
        term = method_of(config).loss_term

        def forward(ids):
            loss = model(ids, labels=ids).loss
            return loss + term(model, config, "default") if term else loss

        after = (lambda step: [h.on_step(model, optimizer, step) for h in hooks]) if hooks else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    model.train()
    times = []
    for step in range(1, total + 1):
        started = time.perf_counter()
        forward(ids).backward()
        optimizer.step()
        if after:
            after(step)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    return {"row": row, "step_s": round(statistics.median(times[2:]), 3), "peak_rss_gb": round(peak, 2),
            "trainable": sum(p.numel() for p in params), "load": load()}


def step() -> list[dict]:
    rows = []
    for row in STEP_ROWS:
        out = subprocess.run([sys.executable, __file__, "--step-child", row], capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if out.returncode or not line:
            raise RuntimeError(f"{row}: {out.stderr[-2000:]}")
        rows.append(json.loads(line[-1]))
        print(line[-1], flush=True)
    return rows


def table(part: str, rows: list[dict], cpu: str) -> str:
    head = f"Measured on {cpu}, 2 shared cores (load averages per row in the .json), bench/bench_adalora_relora.py --part {part}.\n\n"
    if part == "step":
        lines = ["| row | step (fp32, 4x128) | peak RSS | trainable |", "|---|---:|---:|---:|"]
        lines += [f"| {r['row']} | {r['step_s']:.2f} s | {r['peak_rss_gb']:.2f} GB | {r['trainable']:,} |" for r in rows]
        return head + "\n".join(lines) + "\n"
    key = "exact" if part == "quality" else "eval_loss"
    lines = [f"| method | steps | {'held-out exact (event test, 50)' if part == 'quality' else 'held-out text loss'}: mean [min, max] over {len(SEEDS)} seeds | per seed |"
             + (" trainable | file | step |" if part == "quality" else ""),
             "|---|---:|---|---|" + ("---:|---:|---:|" if part == "quality" else "")]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        values = [r[key] for r in mine]
        fmt = (lambda v: f"{v:.0%}") if part == "quality" else (lambda v: f"{v:.4f}")
        line = f"| {method} | {mine[0]['steps']} | {fmt(statistics.mean(values))} [{fmt(min(values))}, {fmt(max(values))}] | {', '.join(map(fmt, values))} |"
        if part == "quality":
            line += f" {mine[0]['trainable']:,} | {mine[0]['file_bytes'] / 1e6:.2f} MB | {statistics.median(r['step_s'] for r in mine):.2f} s |"
        lines.append(line)
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("quality", "cpt", "step"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--step-child", default=None)
    args = parser.parse_args()
    if args.step_child:
        print(json.dumps(step_child(args.step_child)), flush=True)
        return
    from _common import cpu_name

    rows = {"quality": lambda: quality(args.steps or 24), "cpt": lambda: cpt(args.steps or 30), "step": step}[args.part]()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"adalora_relora_{args.part}.json").write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2) + "\n")
    text = table(args.part, rows, cpu_name())
    (RESULTS / f"adalora_relora_{args.part}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
