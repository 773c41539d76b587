"""Where one LoRA train step spends its time, on the embedded SmolLM2-135M (batch 4x256, r=16, all-linear).

    python bench/profile_step.py                       # deltatune, fp32 and bf16 autocast
    python bench/profile_step.py --lib peft            # the same breakdown for peft
    python bench/profile_step.py --precision bf16 --ops 20

Three views per precision, each the median over --steps steps after --warmup:
  1. phases of the step: zero_grad, forward, loss (shifted-label cross-entropy), backward, AdamW step;
  2. the forward split by module hooks: the frozen base linears inside adapter layers, what the adapter layers
     add on top of them (LoRA branch, casts, the add, routing checks), and everything else (attention, norms,
     embedding, lm_head);
  3. with --ops N: the N most expensive operators of one extra step under torch.profiler (self CPU time).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

PHASES = ("zero_grad", "forward", "loss", "backward", "optimizer")


def build(lib: str):
    """(model with one LoRA adapter in train mode, AdamW over its trainable params, input ids, wrapper class)."""
    model, _, _ = C.load_model()
    ids = C.input_ids(model.config.vocab_size)
    if lib == "deltatune":
        import deltatune as dt

        dt.attach(model, dt.LoraConfig(**C.LORA), name="a")
        wrapper = dt.AdapterLayer
    else:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        model = get_peft_model(model, LoraConfig(**C.LORA))
        wrapper = LoraLayer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, ids, wrapper


def phased_step(model, optimizer, ids, precision: str) -> dict[str, float]:
    """One train step, seconds per phase."""
    times, clock = {}, time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[phase], clock = now - clock, now

    optimizer.zero_grad(set_to_none=True)
    lap("zero_grad")
    with C.precision_context(precision):
        logits = model(input_ids=ids, use_cache=False).logits
        lap("forward")
        loss = C.shifted_loss(logits, ids)
        lap("loss")
    loss.backward()
    lap("backward")
    optimizer.step()
    lap("optimizer")
    return times


class ForwardSplit:
    """Forward hooks timing every adapter layer and the base layer inside it (CPU ops are synchronous)."""

    def __init__(self, model, wrapper_type) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.handles = []
        for module in model.modules():
            if isinstance(module, wrapper_type):
                self._time(module, "adapter layers")
                self._time(module.base_layer, "base linears")

    def _time(self, module, key: str) -> None:
        starts: list[float] = []
        self.handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))

        def post(*_):
            self.totals[key] += time.perf_counter() - starts.pop()

        self.handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def profile(lib: str, precision: str, args) -> dict:
    model, optimizer, ids, wrapper = build(lib)
    for _ in range(args.warmup):
        phased_step(model, optimizer, ids, precision)
    steps = [phased_step(model, optimizer, ids, precision) for _ in range(args.steps)]
    phases = {p: statistics.median(s[p] for s in steps) for p in PHASES}
    phases["step"] = statistics.median(sum(s.values()) for s in steps)

    split = ForwardSplit(model, wrapper)
    forward = phased_step(model, optimizer, ids, precision)["forward"]
    split.remove()
    base, layers = split.totals["base linears"], split.totals["adapter layers"]
    forward_split = {"base linears (frozen W0 x)": base, "adapter overhead (LoRA branch, casts, add)": layers - base,
                     "rest (attention, norms, embedding, lm_head)": forward - layers}

    ops = ""
    if args.ops:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            phased_step(model, optimizer, ids, precision)
        ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops, max_name_column_width=40)
    return {"phases": phases, "forward_split": forward_split, "forward_instrumented": forward, "ops": ops,
            "rss_gb": C.peak_rss_gb()}


def table(title: str, rows: dict[str, dict[str, float]], total_key: str | None, precisions) -> str:
    """Seconds and share of the total for each row, one column pair per precision."""
    head = f"| {title} | " + " | ".join(f"{p} s | {p} %" for p in precisions) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(precisions)]
    names = list(next(iter(rows.values())))
    for name in names:
        cells = []
        for p in precisions:
            total = rows[p][total_key] if total_key else sum(rows[p].values())
            cells += [f"{rows[p][name]:.3f}", f"{100 * rows[p][name] / total:.0f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lib", choices=("deltatune", "peft"), default="deltatune")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--ops", type=int, default=12, help="top operators to list from torch.profiler (0: none)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)

    with C.LoadMonitor() as monitor:
        results = {p: profile(args.lib, p, args) for p in precisions}
    print(f"\n{args.lib} LoRA train step, batch {C.BATCH}x{C.SEQ}, r=16 all-linear, {args.threads} threads, "
          f"median of {args.steps} steps\n")
    step = {p: results[p]["phases"] for p in precisions}
    print(table("phase", step, "step", precisions))
    print()
    print(table("forward split (one instrumented step)", {p: results[p]["forward_split"] for p in precisions},
                None, precisions))
    print(f"\npeak RSS {max(r['rss_gb'] for r in results.values()):.2f} GB; other runnable tasks on the machine "
          f"during the run: {monitor.mean:.1f} on average (above ~0.5 the timings are inflated)")
    for p in precisions:
        if results[p]["ops"]:
            print(f"\ntop operators, one {p} step (forward + loss + backward + optimizer):\n{results[p]['ops']}")


if __name__ == "__main__":
    main()
