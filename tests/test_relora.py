"""ReLoRA: a restart keeps the function and resets the optimizer as asked; the jagged lr; the whole change saved
as one plain LoRA (exact, read by peft) or as a dense RELORA file; the base back exactly on disable and delete;
resume across a restart exact; errors before anything changes."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.config import ConfigError
from deltatune.core.io import saved_as
from deltatune.methods.relora import ReLoraConfig, Restarts, reset_optimizer_state
from deltatune.train.hooks import Hook
from deltatune.train.loop import train

from conftest import assert_unchanged, capture_state, make_tiny_llama
from test_train_loop import make_tokenizer, texts, write_jsonl

ADAPTER = {"peft_type": "RELORA", "r": 4, "lora_alpha": 8, "relora_steps": 3, "restart_warmup_steps": 2,
           "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _run(tmp_path, name, tokenizer, *, model=None, hooks=(), adapter=None, **values):
    values.setdefault("max_steps", 8)
    values.setdefault("optim", {"lr": 1e-2, "schedule": "constant"})
    data = {"train": str(write_jsonl(tmp_path / f"{name}.jsonl", texts(8)))}
    return train(model=model or make_tiny_llama(), tokenizer=tokenizer, hooks=hooks, output_dir=str(tmp_path / name),
                 data=data, adapter=adapter or ADAPTER, batch_size=2, precision="fp32", **values)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))


def test_restart_keeps_the_function_and_fills_the_next_merged_slot():
    model = dt.attach(make_tiny_llama(), ReLoraConfig(r=4, lora_alpha=8, relora_steps=2, restart_warmup_steps=1,
                                                      total_step=6, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for key, t in dt.adapter_tensors(model, "default").items():
            if key.endswith("lora_B.weight"):
                t.normal_(0, 0.1)
    before = _logits(model, IDS)
    site = model.get_submodule("model.layers.0.self_attn.q_proj").deltas["default"]
    A, B = site.lora_A.weight.detach().clone(), site.lora_B.weight.detach().clone()
    hook = Restarts(model, dt.adapter_configs(model)["default"], "default")
    hook.on_step(model, None, 1)  # not a restart step
    assert torch.equal(site.lora_A.weight, A)
    hook.on_step(model, None, 2)
    torch.testing.assert_close(_logits(model, IDS), before, atol=1e-5, rtol=1e-5)
    assert torch.equal(site.merged_A[:4], A) and torch.equal(site.merged_B[:, :4], B * 2.0)  # s = 8/4
    assert not site.merged_A[4:].any() and not site.lora_B.weight.any() and not torch.equal(site.lora_A.weight, A)
    assert site.merged_A.shape == (8, 64)  # K = 3 segments, 2 merged: rank 8 below 32 = v_proj's smaller side
    hook.on_step(model, None, 6)  # the last step: nothing to restart for
    assert not site.merged_A[4:].any()


def test_optimizer_state_resets():
    p = torch.nn.Parameter(torch.zeros(50, 40))
    optimizer = torch.optim.AdamW([p])
    for how, ratio in (("reset", 0.0), ("random", 0.75), ("magnitude", 0.9)):
        optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(50, 40), "exp_avg_sq": torch.rand(50, 40)}
        original = optimizer.state[p]["exp_avg"].clone()
        kept = reset_optimizer_state(optimizer, [p], how, ratio, step=3)
        value = optimizer.state[p]["exp_avg"]
        if how == "reset":
            assert not value.any() and not optimizer.state[p]["exp_avg_sq"].any()
        elif how == "random":
            assert 0.7 < (value == 0).float().mean() < 0.8 and torch.equal(value[value != 0], original[value != 0])
        else:
            threshold = torch.quantile(original.abs().flatten(), 0.9)
            assert torch.equal(value, original * (original.abs() > threshold))
        assert kept == int((value != 0).sum() + (optimizer.state[p]["exp_avg_sq"] != 0).sum())
        assert optimizer.state[p]["step"] == 3  # the step count stays (bias correction goes on)


def test_jagged_lr_whole_change_as_plain_lora_and_the_base_back_exactly(tmp_path, tokenizer):
    from peft import PeftModel

    base_logits, base_state = _logits(make_tiny_llama(), IDS), make_tiny_llama().state_dict()
    model = make_tiny_llama()
    result = _run(tmp_path, "run", tokenizer, model=model)
    lrs = [json.loads(line)["lr"] for line in result.metrics_path.read_text().splitlines()]
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.0, 0.005, 0.01, 0.0, 0.005])  # restarts after steps 3 and 6
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 12, 12)
    assert "plain LoRA of rank 12 (3 segments x r=4), exact" in saved_as(result.adapter_dir)
    live = _logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = PeftModel.from_pretrained(make_tiny_llama(), result.adapter_dir)
    for other in (in_peft, dt.load_adapter(make_tiny_llama(), result.adapter_dir)):
        torch.testing.assert_close(_logits(other, IDS), live, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(live, base_logits, atol=1e-3)
    with dt.disable_adapters(model):
        assert torch.equal(_logits(model, IDS), base_logits)
    dt.delete_adapter(model, "default")
    state = model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)


def test_inspect_says_how_the_file_was_saved(tmp_path, tokenizer, capsys):
    from deltatune.cli import main

    result = _run(tmp_path, "i", tokenizer, max_steps=4)
    capsys.readouterr()
    assert main(["inspect", str(result.adapter_dir)]) in (0, None)
    assert "saved as     ReLoRA: saved as one plain LoRA of rank 8 (2 segments x r=4), exact" in capsys.readouterr().out


def test_dense_when_k_r_reaches_a_layer_dimension(tmp_path, tokenizer):
    model = make_tiny_llama()  # K = 3 segments of r = 12: 36 >= 32 (v_proj's output)
    result = _run(tmp_path, "dense", tokenizer, model=model, adapter={**ADAPTER, "r": 12, "lora_alpha": 12})
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "RELORA"
    assert "dense delta (RELORA, read by deltatune only)" in saved_as(result.adapter_dir)
    assert dt.read_adapter(result.adapter_dir)[1]["base_model.model.model.layers.0.self_attn.v_proj.merged"].shape == (32, 64)
    torch.testing.assert_close(_logits(dt.load_adapter(make_tiny_llama(), result.adapter_dir), IDS), _logits(model, IDS),
                               atol=0, rtol=0)


class KillAt(Hook):
    def __init__(self, step):
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            raise KeyError("killed")


@pytest.mark.parametrize("reset", ["random", "magnitude"])
def test_resume_across_a_restart_is_exact(tmp_path, tokenizer, reset):
    common = dict(save_every=2, adapter={**ADAPTER, "optimizer_reset": reset, "optimizer_prune_ratio": 0.5})
    full = _run(tmp_path, "full", tokenizer, **common)
    with pytest.raises(KeyError):
        _run(tmp_path, "cut", tokenizer, hooks=[KillAt(7)], **common)  # newest checkpoint: step 6, the second restart
    resumed = _run(tmp_path, "cut", tokenizer, resume=True, **common)
    assert resumed.losses == {s: full.losses[s] for s in (7, 8)}
    a, b = dt.read_adapter(resumed.adapter_dir)[1], dt.read_adapter(full.adapter_dir)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_errors_before_anything_changes(tmp_path, tokenizer):
    model = make_tiny_llama()
    saved = capture_state(model)
    with pytest.raises(ConfigError, match=r"relora_steps \(9\) is longer than the run \(max_steps=8\).*a last segment "
                                          r"shorter than relora_steps is allowed"):
        _run(tmp_path, "long", tokenizer, model=model, adapter={**ADAPTER, "relora_steps": 9})
    assert_unchanged(model, saved)
    with pytest.raises(ConfigError, match=r"restart_warmup_steps must be in \[0, relora_steps=3\)"):
        ReLoraConfig(relora_steps=3, restart_warmup_steps=3)
    with pytest.raises(ConfigError, match="ReLoRA needs total_step"):
        dt.attach(make_tiny_llama(), ReLoraConfig(relora_steps=3, restart_warmup_steps=1))
    _run(tmp_path, "r", tokenizer, max_steps=4, save_every=2)  # relora_steps 3 into 4 steps: a last segment of 1
    with pytest.raises(ConfigError, match=r"max_steps 4 -> 6, but RELORA's schedule was fitted"):
        _run(tmp_path, "r", tokenizer, max_steps=6, resume=True)
