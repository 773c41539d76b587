"""Per-process state under DDP: 2 CPU processes (gloo) x batch 2 equal 1 process x batch 4 for the methods whose
training adds a loss term (AdaLoRA's γR, computed by every process alike), importance scores and masks (AdaLoRA:
the same all-reduced gradients give the same allocation, checked by distributed.agree) or restarts with random
optimizer-state pruning (ReLoRA: seeded by step and layer)."""
from __future__ import annotations

import json
import os
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import deltatune as dt
from deltatune.train.loop import train

from conftest import make_tiny_llama
from test_ddp import _free_port
from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

ADAPTERS = {
    "ADALORA": {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1,
                "target_modules": ["q_proj", "v_proj"]},
    "RELORA": {"peft_type": "RELORA", "r": 4, "relora_steps": 2, "restart_warmup_steps": 1,
               "optimizer_reset": "random", "optimizer_prune_ratio": 0.5, "target_modules": ["q_proj", "v_proj"]},
}
COMMON = dict(max_steps=4, precision="fp32", optim={"lr": 1e-2})


def _rank(rank: int, port: int, data: str, out: str, adapter: dict, errors) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=out, data={"train": data}, batch_size=2,
              adapter=adapter, **COMMON)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _logged(path, key):
    return [json.loads(line)[key] for line in path.read_text().splitlines() if key in json.loads(line)]


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_two_processes_equal_one(tmp_path, method):
    data = str(write_jsonl(tmp_path / "train.jsonl", prompt_completion(8)))
    single = train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / "single"),
                   data={"train": data}, batch_size=4, adapter=ADAPTERS[method], **COMMON)
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    errors, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, data, str(tmp_path / "ddp"), ADAPTERS[method], errors))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures and all(p.exitcode == 0 for p in procs), "\n".join(failures) or [p.exitcode for p in procs]
    ddp = tmp_path / "ddp"
    assert _logged(ddp / "metrics.jsonl", "loss") == pytest.approx(list(single.losses.values()), rel=1e-6)
    assert _logged(ddp / "metrics.jsonl", "lr") == _logged(single.metrics_path, "lr")
    if method == "ADALORA":
        assert _logged(ddp / "metrics.jsonl", "aux_loss") == pytest.approx(_logged(single.metrics_path, "aux_loss"), rel=1e-6)
    (ca, a, _), (cb, b, _) = dt.read_adapter(ddp / "adapter"), dt.read_adapter(single.adapter_dir)
    assert ca == cb  # AdaLoRA: the same rank_pattern; ReLoRA: the same export
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
