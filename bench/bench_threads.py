"""Thread count and OpenMP waiting on a busy machine: a LoRA training step of the demo (SmolLM2-135M, r=16
all-linear, batch 4x64, bf16 autocast where the CPU has it) quiet and beside synthetic busy processes.

PyTorch's OpenMP threads spin-wait at the end of each parallel region. When another process takes a core,
a spinning thread holds the other core while its partner waits to be scheduled, and a step slowed ~10x
(issue 14: 2.2 s -> 25 s). Each configuration runs in a fresh process (the wait policy is read when OpenMP
starts), with `busy` extra processes spinning on the CPU during its timed steps.

    flock /tmp/deltatune-bench.lock python3 bench/bench_threads.py --out bench/results/threads.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPIN = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def child(threads: int, steps: int, busy: int, governor: bool = False) -> None:
    import torch

    import deltatune as dt
    from deltatune.models import default_compute_dtype, load_model

    torch.set_num_threads(threads)
    if governor:  # as after `apply_threads(0)` picked `threads` in a quiet moment: retune() between steps
        from deltatune.threads import _GOVERNOR, retune

        _GOVERNOR.enable(threads)
    torch.manual_seed(0)
    model, _ = load_model()
    dt.attach(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    dtype = default_compute_dtype()

    def step() -> float:
        if governor:
            retune()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    model.train()
    step()  # warm-up, quiet
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        time.sleep(0.2 if busy else 0)
        times = [step() for _ in range(steps + (3 if governor else 0))][3 if governor else 0:]  # governor: after it acted
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    print(json.dumps({"median_s": statistics.median(times), "times": [round(t, 3) for t in times],
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                      "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(default)"),
                      "dtype": str(dtype), "load": os.getloadavg()[0]}))


def run(threads: int, steps: int, busy: int, policy: str | None, governor: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy and policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--child", "--threads", str(threads), "--steps", str(steps),
                          "--busy", str(busy), *(["--governor"] if governor else [])], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--governor", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="repeat each configuration, keep the best median")
    parser.add_argument("--out", default="bench/results/threads.json")
    args = parser.parse_args()
    if args.child:
        return child(args.threads, args.steps, args.busy, args.governor)
    cores = len(os.sched_getaffinity(0))
    configs = [  # (label, threads, busy, OMP_WAIT_POLICY)
        ("today: 2 threads, active wait, quiet", cores, 0, None),
        ("today: 2 threads, active wait, 1 busy process", cores, 1, None),
        ("passive wait, 2 threads, quiet", cores, 0, "PASSIVE"),
        ("passive wait, 2 threads, 1 busy process", cores, 1, "PASSIVE"),
        ("spin 20k (GOMP_SPINCOUNT), 2 threads, quiet", cores, 0, "spin:20000"),
        ("spin 20k (GOMP_SPINCOUNT), 2 threads, 1 busy", cores, 1, "spin:20000"),
        ("retune (deltatune.threads), 2 threads, quiet", cores, 0, "governor"),
        ("retune (deltatune.threads), 2 threads, 1 busy", cores, 1, "governor"),
        ("1 thread, active wait, quiet", 1, 0, None),
        ("1 thread, active wait, 1 busy process", 1, 1, None),
    ]
    results = []
    for label, threads, busy, policy in configs:
        governor = policy == "governor"
        rounds = [run(threads, args.steps, busy, None if governor else policy, governor) for _ in range(args.rounds)]
        best = min(rounds, key=lambda r: r["median_s"])
        results.append({"config": label, "threads": threads, "busy": busy, "policy": policy or "active",
                        "median_s": best["median_s"], "rounds": rounds})
        print(f"{label:<48} {best['median_s']:.3f} s/step  (load {os.getloadavg()[0]:.1f})", flush=True)
    quiet = results[0]["median_s"]
    for r in results:
        r["vs_today_quiet"] = r["median_s"] / quiet
    summary = {"cpu": cpu_name(), "cores": cores, "uptime": subprocess.run(["uptime"], capture_output=True,
               text=True).stdout.strip(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        print(f"{r['config']:<48} {r['vs_today_quiet']:.2f}x today's quiet step")


if __name__ == "__main__":
    main()
