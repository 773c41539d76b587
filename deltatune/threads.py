"""CPU thread count for torch, chosen from the cores that are idle right now (every command, and the demo).

    count, why = choose_threads(0)      # 0: automatic; a positive number is taken as given
    torch.set_num_threads(count)
"""
from __future__ import annotations

import os
import time


def choose_threads(requested: int) -> tuple[int, str]:
    """(CPU threads for torch, why): `requested` if positive, else one thread per core the machine has idle.

    PyTorch's OpenMP threads busy-wait for each other at every operation. On a machine whose cores are
    already taken, a second thread mostly waits for a core to come back while the first spins: measured on
    2 cores at load average 6, a LoRA training step took 2-3x longer with 2 threads than with 1, and a
    decoding step 9x longer. On an idle machine every core helps.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0:
        return requested, "--threads"
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    busy = _busy_cores()
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    return threads, f"{busy:.1f} of {cores} cores busy with other work; --threads N to choose"


def _busy_cores(samples: int = 5, interval: float = 0.05) -> float:
    """Other runnable tasks right now, averaged over a quarter of a second (Linux; 0 elsewhere).

    Not the load average: it trails by minutes, so a machine that has just gone idle still looks busy.
    """
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])  # includes this process
        except (OSError, ValueError, IndexError):
            return 0.0
        counts.append(max(0, running - 1))
        time.sleep(interval)
    return sum(counts) / len(counts)


def apply_threads(requested: int = 0) -> str | None:
    """Set torch's CPU thread count by `choose_threads` and return the line that says so; None on a GPU machine
    (the CPU then only feeds the device) unless a count was requested."""
    import torch

    if requested <= 0 and torch.cuda.is_available():
        return None
    count, why = choose_threads(requested)
    torch.set_num_threads(count)
    return f"using {count} CPU thread{'s' if count > 1 else ''} ({why})"
