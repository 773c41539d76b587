"""The demonstration: teach the embedded SmolLM2-135M a structured-extraction task with LoRA on a CPU, and
measure the gain honestly, on held-out examples only, before and after.

The task (data in `deltatune/demo_data/`, written by `scripts/make_demo_data.py`): one sentence about a
person in, one line of JSON out,

    At 41, Dalia moved to Bergen for work.   ->   {"name": "Dalia", "age": 41, "city": "Bergen"}

with the format spelled out in the system prompt. The base model rarely answers in that format; the 50
held-out sentences use names and cities that never occur in training, and two phrasings never seen in
training, so the gain is the skill, not memorised answers. Steps:

    1. load the base model; score it on the held-out set: greedy generation, exact match (and, to be fair to
       the base model, JSON match: the first JSON object in its answer equals the reference, layout
       forgiven), plus the teacher-forced loss on the reference answers
    2. train LoRA (r=16, alpha=32, all linear layers) with `deltatune.train.loop.train`: DEMO_STEPS steps of
       8 examples, lr 1e-3, bf16 autocast where the CPU/GPU computes bf16 natively, fp32 elsewhere
    3. reload the saved adapter (peft's format) into a fresh base and score it the same way
    4. print a before/after table and three sample generations (the first three held-out examples, not
       picked); the adapter, metrics.jsonl, loss.png and demo.json (every number) are in the output dir
"""
from __future__ import annotations

import json
import shlex
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .core.config import ConfigError
from .threads import apply_threads, choose_threads  # noqa: F401 (choose_threads: public here before)

DEMO_STEPS = 12
SUMMARY = "demo.json"  # also marks a directory as the demo's own, so a rerun may replace it
N_SAMPLES = 3
MAX_NEW_TOKENS = 28  # the longest reference is 24 tokens; a rambling answer is cut here, not scored longer


def data_path(split: str) -> Path:
    """The shipped demo data file of `split` ("train" or "test")."""
    return Path(str(resources.files("deltatune") / "demo_data" / f"{split}.jsonl"))


def demo_config(out: Path, steps: int) -> dict[str, Any]:
    """Keyword values for `train`: what the demo trains, in the same keys as a YAML config."""
    return {
        "adapter": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(data_path("train")), "eval": str(data_path("test")), "max_length": 96},
        "batch_size": 8,
        "max_steps": steps,
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "cosine", "min_lr_ratio": 0.1},
        "precision": "auto",
        "output_dir": str(out),
        "log_every": 1,
    }


def _prepare(out: Path) -> None:
    """Replace a previous demo's output directory; refuse to touch any other non-empty directory."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / SUMMARY).is_file():
            raise ConfigError(f"--out {out} is a non-empty directory that no demo wrote; choose another --out")
        shutil.rmtree(out)


def _score(model: Any, tokenizer: Any, test: list[dict[str, Any]], examples: list[Any] | None) -> dict[str, Any]:
    """Exact and JSON match of greedy answers, and (given examples) the teacher-forced loss."""
    from .train.evaluate import bf16_available, eval_generation, eval_loss, is_match

    bf16 = bf16_available(model)
    gen = eval_generation(model, tokenizer, test, max_new_tokens=MAX_NEW_TOKENS, match="exact",
                          batch_size=len(test), bf16=bf16)
    samples = gen["samples"]
    scores = {"exact": gen["score"], "json": sum(is_match(s["output"], s["reference"], "json") for s in samples) / len(samples)}
    loss = eval_loss(model, tokenizer, examples, batch_size=8, bf16=bf16)["loss"] if examples is not None else None
    return {**scores, "loss": loss, "outputs": [s["output"] for s in samples]}


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def try_command(adapter: Path, messages: list[dict[str, Any]], model_name: str | None) -> str:
    """A `deltatune generate` command line that asks the adapter as it was trained: with the task's system prompt
    and a held-out input, shell-quoted so that it works as printed."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    user = next(m["content"] for m in messages if m["role"] == "user")
    argv = ["deltatune", "generate", *(["--base", model_name] if model_name else []), "--adapter", str(adapter)]
    argv += [*(["--system", system] if system else []), "--prompt", user]
    return shlex.join(argv)


def _report(before: dict[str, Any], after: dict[str, Any], test: list[dict[str, Any]], times: dict[str, float],
            steps: int, out: Path, model_name: str | None) -> None:
    from .train.evaluate import is_match

    n = len(test)
    rows = [
        (f"exact match, {n} held-out", f"{before['exact']:.0%}", f"{after['exact']:.0%}"),
        ("JSON match (layout forgiven)", f"{before['json']:.0%}", f"{after['json']:.0%}"),
        ("eval loss (nats/answer token)", f"{before['loss']:.3f}", f"{after['loss']:.3f}"),
        ("training", "-", f"{steps} steps x 8 examples, {_minutes(times['train'])}"),
    ]
    print("\n" + f"{'':<32}{'base model':<14}{'+ LoRA adapter'}")
    for label, a, b in rows:
        print(f"{label:<32}{a:<14}{b}")
    print(f"\nsample generations (the first {N_SAMPLES} held-out examples):")
    for i in range(N_SAMPLES):
        messages = test[i]["messages"]
        print(f"  input      {messages[-2]['content']}")
        print(f"  reference  {test[i]['reference']}")
        for tag, result in (("base", before), ("LoRA", after)):
            output = result["outputs"][i]
            mark = "ok" if is_match(output, test[i]["reference"], "exact") else "--"
            one_line = output.replace("\\", "\\\\").replace("\n", "\\n")  # newlines shown, quotes left alone
            print(f"  {tag:<5}{mark:>4}  {one_line[:110]}")
        print()
    print(f"adapter      {out / 'adapter'} (peft format)")
    print(f"try it       {try_command(out / 'adapter', test[0]['messages'], model_name)}")
    print(f"loss plot    {out / 'loss.png'}")
    print(f"total time   {_minutes(times['total'])} (model load, 2 evaluations, training)")


def run_demo(out: Path, steps: int | None = None, model_name: str | None = None, threads: int = 0) -> dict[str, Any]:
    """Run the demonstration (see the module docstring); returns the numbers it printed, also in out/demo.json.

    threads: CPU threads for torch; 0 picks them from the machine's idle cores (`choose_threads`).
    """
    import torch

    steps = DEMO_STEPS if steps is None else steps
    if steps <= 0:
        raise ConfigError(f"--steps must be positive, got {steps}")
    out = Path(out)
    _prepare(out)
    previous_threads = torch.get_num_threads()
    line = apply_threads(threads) if not torch.cuda.is_available() else None
    if line:
        print(line, flush=True)
    try:
        return _run(out, steps, model_name)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: Path, steps: int, model_name: str | None) -> dict[str, Any]:
    from .core.io import load_adapter
    from .data import load_records, tokenize
    from .models import load_model
    from .train.evaluate import bf16_available
    from .train.loop import train
    from .train.memory import store_for_bf16_inference

    start = time.perf_counter()
    model, tokenizer = load_model(model_name)
    test = load_records(data_path("test"))
    examples, _ = tokenize(test, tokenizer, format="messages", max_length=96, source="demo test set")
    print(f"scoring the base model on {len(test)} held-out examples ...", flush=True)
    before = _score(model, tokenizer, test, examples)
    print(f"base model: exact match {before['exact']:.0%}, JSON match {before['json']:.0%}, eval loss {before['loss']:.3f}", flush=True)

    print(f"training LoRA for {steps} steps ...", flush=True)
    train_start = time.perf_counter()
    result = train(model=model, tokenizer=tokenizer, **demo_config(out, steps))
    train_time = time.perf_counter() - train_start

    print("scoring the saved adapter, reloaded into a fresh base model ...", flush=True)
    fresh, _ = load_model(model_name)
    load_adapter(fresh, result.adapter_dir)
    if bf16_available(fresh):
        store_for_bf16_inference(fresh)  # only scored from here on: a faster decode, the same logits
    after = _score(fresh, tokenizer, test, None)
    after["loss"] = result.eval["eval_loss"]  # the loop's evaluation on the same held-out set, same loss
    times = {"train": train_time, "total": time.perf_counter() - start}
    summary = {"steps": steps, "held_out": len(test), "before": before, "after": after, "seconds": times}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    _report(before, after, test, times, steps, out, model_name)
    return summary
