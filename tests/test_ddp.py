"""Data parallel parity: 2 CPU processes (gloo) x batch 2 train the same adapter as 1 process x batch 4, on a
16-bit base and on a 4-bit NF4 one (QLoRA: the NF4 codes are buffers, constant on every rank, never re-broadcast)."""
from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import deltatune as dt
from deltatune.train.distributed import World, shard
from deltatune.train.loop import train

from conftest import make_tiny_llama
from test_train_loop import ADAPTER, make_tokenizer, prompt_completion, write_jsonl

STEPS = 2
COMMON = dict(max_steps=STEPS, precision="fp32", optim={"lr": 1e-3}, adapter={**ADAPTER, "init_lora_weights": "gaussian"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world_size: int, port: int, data: str, out: str, quantize, errors) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                          RANK=str(rank), LOCAL_RANK=str(rank))
        train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=out, data={"train": data},
              batch_size=2, quantize=quantize, **COMMON)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, quantize):
    # 8 examples of different lengths: each global batch of 4 splits unevenly in target tokens across ranks,
    # so equality needs the all-reduced token count, not a per-rank mean.
    data = str(write_jsonl(tmp_path / "train.jsonl", prompt_completion(8)))
    single = train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / "single"),
                   data={"train": data}, batch_size=4, quantize=quantize, **COMMON)
    # fork: the children inherit the imported torch/transformers (seconds, not tens); spawn where fork is unsafe
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, data, str(tmp_path / "ddp"), quantize, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures and all(p.exitcode == 0 for p in procs), "\n".join(failures) or [p.exitcode for p in procs]
    ddp = tmp_path / "ddp"
    assert _losses(ddp / "metrics.jsonl") == pytest.approx(list(single.losses.values()), rel=1e-6)
    (_, a, meta), (_, b, _) = dt.read_adapter(ddp / "adapter"), dt.read_adapter(single.adapter_dir)
    assert meta.get("deltatune_base_quantization") == ("nf4-dq" if quantize else None)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert [p.name for p in (ddp / "checkpoints").iterdir()] == [f"step-{STEPS:06d}"]  # rank 0 alone wrote


def test_shard_is_disjoint_and_covers_the_batch():
    batch = list(range(7))
    parts = [shard(batch, World(rank=r, size=3)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
