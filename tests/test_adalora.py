"""AdaLoRA: parity with peft (forward, penalty, scores, masks, budget, files both ways), the loss-term seam's
gradients through train() (grad_accum 1 and 2), the pruned file, resume at every phase of the schedule, errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.config import ConfigError
from deltatune.methods.adalora import AdaLoraConfig, RankAllocator, orthogonality_penalty
from deltatune.train.hooks import Hook
from deltatune.train.loop import train

from conftest import capture_state, assert_unchanged, make_tiny_llama
from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
TRAIN_ADAPTER = {"peft_type": "ADALORA", **SCHEDULE}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _ids(seed=0):
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))


def _peft_twin(model, total_step):
    """peft's AdaLoRA on the same tiny base, holding our adapter's tensors (task_type: peft adds the penalty only
    through PeftModelForCausalLM)."""
    from peft import AdaLoraConfig as PeftAdaLoraConfig, get_peft_model

    twin = get_peft_model(make_tiny_llama(), PeftAdaLoraConfig(task_type="CAUSAL_LM", total_step=total_step, **SCHEDULE))
    ours = dt.adapter_tensors(model, "default")
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_" in name:
                param.copy_(ours[name.replace(".default", "")])
    return twin


def _sgd(params, lr=0.05):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad


def test_training_steps_scores_masks_and_files_equal_peft(tmp_path):
    """Ten SGD steps through all three phases: losses (task + γR), rank_pattern and every tensor bitwise equal to
    peft's; our pruned file loads in peft, peft's in deltatune, with equal logits."""
    from peft import PeftModel

    T = 10
    model = dt.attach(make_tiny_llama(), AdaLoraConfig(total_step=T, **SCHEDULE))
    twin = _peft_twin(model, T)
    hook = RankAllocator(model, dt.adapter_configs(model)["default"], "default")
    model.train(), twin.train()
    ids = _ids()
    for step in range(1, T + 1):
        ours = model(ids, labels=ids).loss + orthogonality_penalty(model, dt.adapter_configs(model)["default"], "default")
        theirs = twin(input_ids=ids, labels=ids).loss
        assert ours.item() == theirs.item()
        ours.backward(), theirs.backward()
        _sgd(model.parameters()), _sgd(twin.parameters())
        hook.on_step(model, None, step)
        twin.base_model.update_and_allocate(step)
        model.zero_grad(), twin.zero_grad()
    pattern = {k.replace(".default", ""): v for k, v in twin.peft_config["default"].rank_pattern.items()}
    assert dt.adapter_configs(model)["default"].rank_pattern == pattern
    assert 0 < sum(map(sum, pattern.values())) < 16
    live = dt.adapter_tensors(model, "default")
    for name, param in twin.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, live[name.replace(".default", "")]), name
    model.eval()
    dt.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == pattern and config["total_step"] == T
    assert dt.read_adapter(tmp_path / "ours")[1][
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    kept = sum(map(sum, pattern.values()))
    assert f"{kept} of 16 triplets kept" in dt.core.io.saved_as(tmp_path / "ours")
    assert dt.adapter_tensors(model, "default")["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")
        twin.save_pretrained(tmp_path / "peft")
    in_dt = dt.load_adapter(make_tiny_llama(), tmp_path / "ours")
    from_peft = dt.load_adapter(make_tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        expected = model(ids).logits
        for other in (in_peft, in_dt, from_peft):
            torch.testing.assert_close(other(ids).logits, expected, atol=1e-5, rtol=1e-5)
    dt.save_adapter(in_dt, tmp_path / "again")  # a pruned adapter saved again is the same file
    again, first = dt.read_adapter(tmp_path / "again")[1], dt.read_adapter(tmp_path / "ours")[1]
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_budget_schedule_equals_peft():
    from peft import AdaLoraConfig as PeftAdaLoraConfig, get_peft_model
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    for tinit, tfinal, delta_t in ((0, 0, 1), (3, 5, 2), (2, 1, 3)):
        kw = dict(SCHEDULE, tinit=tinit, tfinal=tfinal, deltaT=delta_t)
        model = dt.attach(make_tiny_llama(), AdaLoraConfig(total_step=20, **kw))
        ours = RankAllocator(model, dt.adapter_configs(model)["default"], "default")
        twin = get_peft_model(make_tiny_llama(), PeftAdaLoraConfig(total_step=20, **kw))
        theirs = PeftRankAllocator(twin.base_model.model, twin.peft_config["default"], "default")
        assert [ours.budget(t) for t in range(1, 21)] == [theirs.budget_schedule(t) for t in range(1, 21)]


def test_penalty_is_the_formula():
    model = dt.attach(make_tiny_llama(), AdaLoraConfig(total_step=5, orth_reg_weight=0.3, **SCHEDULE))
    norms = []
    for key, t in dt.adapter_tensors(model, "default").items():
        if key.endswith("lora_A"):
            norms.append(torch.sqrt(((t @ t.T - torch.eye(t.shape[0])) ** 2).sum()))
        elif key.endswith("lora_B"):
            norms.append(torch.sqrt(((t.T @ t - torch.eye(t.shape[1])) ** 2).sum()))
    penalty = orthogonality_penalty(model, dt.adapter_configs(model)["default"], "default")
    torch.testing.assert_close(penalty, 0.3 * torch.stack(norms).mean())


class Grads(Hook):
    """Records every trainable tensor's value and gradient at step 1, just before the optimizer uses them."""

    def __init__(self):
        self.grads, self.values = {}, {}

    def before_step(self, model, optimizer, step):
        if step == 1:
            for key, t in dt.adapter_tensors(model, "default").items():
                self.grads[key], self.values[key] = t.grad.clone(), t.detach().clone()

    def on_step(self, model, optimizer, step):
        pass


def _run(tmp_path, name, tokenizer, *, hooks=(), adapter=None, **values):
    data = {"train": str(write_jsonl(tmp_path / f"{name}.jsonl", prompt_completion(values.pop("n", 4))))}
    values.setdefault("max_steps", 4)
    values.setdefault("optim", {"lr": 1e-2, "max_grad_norm": 0.0})
    return train(model=make_tiny_llama(), tokenizer=tokenizer, hooks=hooks, output_dir=str(tmp_path / name),
                 data=data, adapter=adapter or TRAIN_ADAPTER, precision="fp32", **values)


def test_loss_term_gradient_is_task_mean_plus_penalty_under_grad_accum(tmp_path, tokenizer):
    """grad(step 1) = grad(task mean) + γ·grad(R) with the batch whole or in 2 micro-batches; aux_loss = γR logged."""
    with_term, accumulated, without = Grads(), Grads(), Grads()
    result = _run(tmp_path, "g1", tokenizer, hooks=[with_term], batch_size=4)
    _run(tmp_path, "g2", tokenizer, hooks=[accumulated], batch_size=2, grad_accum=2)
    _run(tmp_path, "g0", tokenizer, hooks=[without], batch_size=4, adapter={**TRAIN_ADAPTER, "orth_reg_weight": 0.0})
    model = dt.attach(make_tiny_llama(), AdaLoraConfig(total_step=4, **SCHEDULE))
    live = dt.adapter_tensors(model, "default")
    with torch.no_grad():
        for key, value in with_term.values.items():
            live[key].copy_(value)
    penalty = orthogonality_penalty(model, dt.adapter_configs(model)["default"], "default")
    penalty.backward()
    for key in live:
        torch.testing.assert_close(with_term.grads[key], without.grads[key] + (live[key].grad if live[key].grad is not None else 0), atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(accumulated.grads[key], with_term.grads[key], atol=1e-7, rtol=1e-5)
    logged = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if '"loss"' in line]
    assert logged[0]["aux_loss"] == pytest.approx(penalty.item(), rel=1e-6)


class KillAt(Hook):
    def __init__(self, step):
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            raise KeyError("killed")


@pytest.mark.parametrize("cut", [1, 3, 5])  # the initial phase, the shrinking phase, the final phase (T=6)
def test_resume_at_any_point_of_the_schedule_is_exact(tmp_path, tokenizer, cut):
    common = dict(max_steps=6, batch_size=2, save_every=1, n=6)
    full = _run(tmp_path, "full", tokenizer, **common)
    with pytest.raises(KeyError):
        _run(tmp_path, "cut", tokenizer, hooks=[KillAt(cut + 1)], **common)
    resumed = _run(tmp_path, "cut", tokenizer, resume=True, **common)
    assert resumed.losses == {s: full.losses[s] for s in range(cut + 1, 7)}
    a, b = dt.read_adapter(resumed.adapter_dir), dt.read_adapter(full.adapter_dir)
    assert a[0] == b[0] and a[0].rank_pattern  # the same allocation, recorded in the file
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_schedule_must_fit_max_steps_and_cannot_change_on_resume(tmp_path, tokenizer):
    model = make_tiny_llama()
    saved = capture_state(model)
    with pytest.raises(ConfigError, match=r"tinit \(1\) must be below max_steps − tfinal \(2 − 2 = 0\)"):
        train(model=model, tokenizer=tokenizer, output_dir=str(tmp_path / "short"), max_steps=2, precision="fp32",
              data={"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(4)))}, adapter=TRAIN_ADAPTER)
    assert_unchanged(model, saved)
    assert not (tmp_path / "short" / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"total_step \(9\) differs from max_steps \(4\)"):
        _run(tmp_path, "t", tokenizer, adapter={**TRAIN_ADAPTER, "total_step": 9})
    _run(tmp_path, "r", tokenizer, max_steps=4, save_every=2)
    with pytest.raises(ConfigError, match=r"max_steps 4 -> 8, but ADALORA's schedule was fitted"):
        _run(tmp_path, "r", tokenizer, max_steps=8, resume=True)


def test_rank_pattern_update_after_attach_is_validated():
    model = dt.attach(make_tiny_llama(), AdaLoraConfig(total_step=5, **SCHEDULE))
    good = {f"model.layers.{i}.self_attn.{m}.lora_E": [True, False, True, True] for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert dt.update_config(model, "default", rank_pattern=good).rank_pattern == good
    assert dt.adapter_configs(model)["default"].rank_pattern == good
    with pytest.raises(ConfigError, match=r"rank_pattern\['x.lora_E'\] must be a list of init_r=4"):
        dt.update_config(model, "default", rank_pattern={"x.lora_E": [True]})
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn.k_proj.lora_E' is not an adapted layer"):
        dt.update_config(model, "default", rank_pattern={**good, "model.layers.0.self_attn.k_proj.lora_E": [True] * 4})
    with pytest.raises(ConfigError, match=r"init_r of adapter 'default' cannot change after attach"):
        dt.update_config(model, "default", init_r=8)
    assert dt.adapter_configs(model)["default"].rank_pattern == good  # refused changes left it as it was
    with pytest.raises(ConfigError, match="target_r"):
        AdaLoraConfig(init_r=4, target_r=6)
