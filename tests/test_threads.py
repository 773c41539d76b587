"""deltatune.threads: the automatic thread count is refitted during a run (other work arriving or leaving),
never when a count was given; the sampling needs no sleeping."""
from __future__ import annotations

import pytest
import torch

from deltatune import threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads.stop_retuning()


def test_an_automatic_count_follows_other_work(two_cores, monkeypatch):
    others = iter([0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    monkeypatch.setattr(threads, "_busy_cores", lambda: 0.0)  # quiet when the run starts
    monkeypatch.setattr(threads, "_other_runnable", lambda: next(others))
    assert threads.apply_threads(0).startswith("using 2 CPU threads")
    lines = [threads.retune() for _ in range(12)]
    assert lines[:3] == [None, None, None] and torch.get_num_threads() == 2  # after 6 calls: still 2 at call 3
    assert lines[5] and "using 1 CPU thread (was 2: 1 of 2 cores now busy" in lines[5]
    assert [line for line in lines[6:] if line] == ["using 2 CPU threads (was 1: 0 of 2 cores now busy with other work)"]
    assert torch.get_num_threads() == 2


def test_a_given_count_is_never_changed(two_cores, monkeypatch):
    monkeypatch.setattr(threads, "_other_runnable", lambda: 1)
    threads.apply_threads(2)
    assert all(threads.retune() is None for _ in range(9)) and torch.get_num_threads() == 2


def test_other_runnable_reads_proc_without_sleeping():
    value = threads._other_runnable()
    assert value is None or value >= 0


def test_the_cli_stops_retuning_when_its_command_ends(two_cores, monkeypatch, capsys):
    from deltatune.cli import main

    monkeypatch.setattr(threads, "_busy_cores", lambda: 0.0)
    monkeypatch.setattr(threads, "_other_runnable", lambda: 1)
    assert main(["eval", "--data", "missing.jsonl"]) == 2  # any command that chose its threads
    assert all(threads.retune() is None for _ in range(6))
