"""Proxy-tuning on the embedded model, shown honestly with the one model there is.

    python bench/bench_proxy.py                    # twin of 8 layers, 40 training steps
    python bench/bench_proxy.py --layers 20 --steps 40 --alpha 1,0.5
    python bench/bench_proxy.py --layers 26 --steps 80 --alpha 1,0.5 --threads 1 --out proxy_26   # docs/serving.md

The small pair is cut from SmolLM2-135M-Instruct itself (`truncated_twin`: its first k layers, final norm and
head). The twin is tuned with LoRA on the demo task (deltatune/demo_data/train.jsonl, the demo's settings but
more steps: it starts further from the task), then three systems answer the 50 held-out examples
(deltatune/demo_data/test.jsonl) greedily through the serving engine:

  full alone        the 30-layer model, untouched
  tuned twin alone  the k-layer twin with its LoRA adapter
  proxy-tuned full  the full model steered by (tuned twin - untuned twin): softmax(s_M + alpha(s_M+ - s_M-))

and a fourth for reference, the full model with its own LoRA tuned by the demo's recipe when --full-lora is
given. Scores: exact match and JSON match (layout forgiven) as in `deltatune demo`. Results in
bench/results/proxy.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
import deltatune as dt  # noqa: E402
from deltatune.data import load_records  # noqa: E402
from deltatune.demo import MAX_NEW_TOKENS, data_path, demo_config  # noqa: E402
from deltatune.models import load_model  # noqa: E402
from deltatune.serve import Engine  # noqa: E402
from deltatune.serve.proxy import ProxyEngine, truncated_twin  # noqa: E402
from deltatune.train.evaluate import is_match, prompt_and_reference, prompt_ids  # noqa: E402
from deltatune.train.loop import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def score(engine: Engine, prompts: list[list[int]], references: list[str], adapter: str | None) -> dict:
    start = time.perf_counter()
    outs = engine.generate(prompts, [adapter] * len(prompts), max_new_tokens=MAX_NEW_TOKENS)
    texts = [o.text for o in outs]
    n = len(texts)
    return {"exact": sum(is_match(t, r, "exact") for t, r in zip(texts, references)) / n,
            "json": sum(is_match(t, r, "json") for t, r in zip(texts, references)) / n,
            "seconds": time.perf_counter() - start, "outputs": texts}


def tune(model, tokenizer, out: Path, steps: int) -> Path:
    config = demo_config(out, steps)
    config["precision"] = "fp32"
    return train(model=model, tokenizer=tokenizer, **config).adapter_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="layers of the small twin")
    parser.add_argument("--steps", type=int, default=40, help="LoRA steps for the twin")
    parser.add_argument("--alpha", default="1", help="steering strengths, comma-separated (each one a row)")
    parser.add_argument("--full-lora", action="store_true", help="also tune the full model (the demo's 12 steps)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="proxy", help="results file name in bench/results (.json and .md)")
    args = parser.parse_args()
    from deltatune.threads import choose_threads

    threads, _ = choose_threads(args.threads)
    torch.set_num_threads(threads)
    model, tokenizer = load_model(None)
    test = load_records(data_path("test"))
    pairs = [prompt_and_reference(r) for r in test]
    prompts = [prompt_ids(tokenizer, p) for p, _ in pairs]
    references = [r for _, r in pairs]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        twin = truncated_twin(model, args.layers)
        start = time.perf_counter()
        adapter = tune(twin, tokenizer, Path(tmp) / "twin", args.steps)
        train_s = time.perf_counter() - start
        small = truncated_twin(model, args.layers)  # fresh twin: the tuned adapter loads as "tuned"
        dt.load_adapter(small, adapter, "tuned")
        rows["full alone"] = score(Engine(model, tokenizer), prompts, references, None)
        rows[f"tuned twin alone ({args.layers} layers)"] = score(Engine(small, tokenizer), prompts, references, "tuned")
        for alpha in [float(a) for a in args.alpha.split(",")]:
            proxy = ProxyEngine(model, tokenizer, expert=(small, "tuned"), anti_expert=(small, None), alpha=alpha)
            rows[f"proxy-tuned full (alpha {alpha:g})"] = score(proxy, prompts, references, None)
        if args.full_lora:
            full_adapter = tune(model, tokenizer, Path(tmp) / "full", 12)
            fresh, _ = load_model(None)
            dt.load_adapter(fresh, full_adapter, "full")
            rows["full + own LoRA (demo recipe)"] = score(Engine(fresh, tokenizer), prompts, references, "full")
        for label, row in rows.items():
            print(f"{label:<34} exact {row['exact']:.0%}  JSON {row['json']:.0%}  ({row['seconds']:.0f} s)", flush=True)
    meta = {"cpu": C.cpu_name(), "threads": threads, "layers": args.layers, "steps": args.steps, "alpha": args.alpha,
            "train_seconds": train_s, "held_out": len(test), "when": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Proxy-tuning on the demo task: twin = first {args.layers} layers + head of SmolLM2-135M-Instruct, LoRA "
             f"r=16 all-linear, {args.steps} steps ({train_s:.0f} s); {len(test)} held-out examples, greedy, fp32; "
             f"{meta['cpu']}, {threads} thread(s), {meta['when']}", "", "| system | exact match | JSON match |", "|---|---|---|"]
    lines += [f"| {label} | {row['exact']:.0%} | {row['json']:.0%} |" for label, row in rows.items()]
    lines += ["", "First three held-out answers:", ""]
    for i in range(3):
        lines.append(f"- reference `{references[i]}`")
        lines += [f"  - {label}: `{row['outputs'][i][:100]}`" for label, row in rows.items()]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
