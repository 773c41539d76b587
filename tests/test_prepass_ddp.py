"""The pre-pass and the masks under data parallelism: 2 CPU processes (gloo) x batch 2 end where 1 process x
batch 4 ends, for FishMask (the Fisher summed over processes: the same mask) and Child-tuning_F (the same
Bernoulli masks from the adapter's seeded generator on every process)."""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import deltatune as dt
from deltatune.train.loop import train

from conftest import make_tiny_llama
from test_ddp import _free_port, _losses
from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

ADAPTERS = {
    "fishmask": {"peft_type": "FISHMASK", "keep_fraction": 0.02, "num_examples": 8},
    "child-tuning-f": {"peft_type": "CHILD_TUNING_F", "target_modules": ["mlp"], "reserve_p": 0.5},
}


def _common(adapter):
    return dict(max_steps=2, precision="fp32", optim={"lr": 1e-3}, adapter=adapter)


def _rank(rank, port, data, out, adapter, errors):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                          LOCAL_RANK=str(rank))
        train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=out, data={"train": data},
              batch_size=2, **_common(adapter))
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


@pytest.mark.parametrize("name", ADAPTERS)
def test_two_processes_equal_one_process(tmp_path, name):
    data = str(write_jsonl(tmp_path / "train.jsonl", prompt_completion(8)))
    single = train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / "single"),
                   data={"train": data}, batch_size=4, **_common(ADAPTERS[name]))
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, data, str(tmp_path / "ddp"), ADAPTERS[name], errors))
             for r in range(2)]
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
    assert _losses(tmp_path / "ddp" / "metrics.jsonl") == pytest.approx(list(single.losses.values()), rel=1e-6)
    (ca, a, _), (cb, b, _) = dt.read_adapter(tmp_path / "ddp" / "adapter"), dt.read_adapter(single.adapter_dir)
    assert getattr(ca, "kept", None) == getattr(cb, "kept", None) and a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a[key], b[key])  # the same indices: the Fisher was summed over processes
