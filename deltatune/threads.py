"""CPU thread count for torch, chosen from the cores that are idle right now (every command, and the demo).

    count, why = choose_threads(0)      # 0: automatic; a positive number is taken as given
    torch.set_num_threads(count)

An automatic choice is a snapshot; the training loop calls `retune()` after every step, which refits it to the
cores other work leaves idle (issue 14: 2 threads picked in a quiet moment ran a step ~10x slower once another
process took a core; bench/bench_threads.py measures it beside synthetic busy processes).
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
    (the CPU then only feeds the device) unless a count was requested. An automatic choice is kept up to date
    during training (`retune`), since other work may arrive or leave after this snapshot."""
    import torch

    if requested <= 0 and torch.cuda.is_available():
        return None
    count, why = choose_threads(requested)
    torch.set_num_threads(count)
    _GOVERNOR.enable(count if requested <= 0 and "OMP_NUM_THREADS" not in os.environ else 0)
    return f"using {count} CPU thread{'s' if count > 1 else ''} ({why})"


class _Governor:
    """Keeps an automatic thread count fitted to the idle cores while a run goes on: one cheap sample of the
    other runnable tasks per call (no sleeping: /proc/loadavg minus this process's own running threads),
    and every `every` calls the count becomes one thread per core the others leave idle, if that differs."""

    def __init__(self, every: int = 3) -> None:
        self.every, self.current, self.samples = every, 0, []

    def enable(self, count: int) -> None:
        self.current, self.samples = count, []  # 0: a count was given (--threads, OMP_NUM_THREADS): never change it

    def __call__(self) -> str | None:
        if not self.current:
            return None
        other = _other_runnable()
        if other is None:
            return None
        self.samples.append(other)
        if len(self.samples) < self.every:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = sorted(self.samples)[len(self.samples) // 2]  # the median: one odd sample changes nothing
        self.samples = []
        wanted = max(1, min(cores, cores - busy))
        if wanted == self.current:
            return None
        import torch

        torch.set_num_threads(wanted)
        line = (f"using {wanted} CPU thread{'s' if wanted > 1 else ''} (was {self.current}: {busy} of {cores} cores "
                "now busy with other work)")
        self.current = wanted
        return line


def _other_runnable() -> int | None:
    """Runnable tasks of other processes right now (Linux), or None where /proc does not say."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        mine = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as f:
                mine += f.read().rpartition(")")[2].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(mine, 1))


_GOVERNOR = _Governor()


def stop_retuning() -> None:
    """`retune` does nothing from now on, until the next automatic `apply_threads`."""
    _GOVERNOR.enable(0)


def retune() -> str | None:
    """Call between training steps: refits an automatic thread count to the cores idle now; returns the line to
    print when it changed the count (None otherwise, and always when the count was given)."""
    return _GOVERNOR()
