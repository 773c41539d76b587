"""Child-tuning: F's Bernoulli masks (fraction, 1/p rescaling, reproducible from the seed, state restored), the
optimizer treatment (masked entries bitwise unchanged under AdamW with decay and momentum, the others exactly
AdamW on g·M/p), D's percentile mask from the clipped Fisher in FishMask's sparse form, errors, train()."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import make_tiny_llama
from deltatune.methods import child_tuning as ct
from deltatune.methods import fishmask as fm
from deltatune.train.prepass import local_data
from test_fishmask import examples


def _step(model, hook, optimizer, ids, step):
    loss = model(ids, labels=ids).loss
    optimizer.zero_grad()
    loss.backward()
    hook.before_step(model, optimizer, step)
    optimizer.step()
    hook.on_step(model, optimizer, step)


def test_masked_entries_stay_bitwise_and_the_others_follow_adamw_on_the_rescaled_gradient():
    model = dt.attach(make_tiny_llama(), dt.ChildTuningConfig(target_modules=["mlp"], reserve_p=0.3, seed=4)).train()
    hook = ct.step_hook(model, dt.adapter_configs(model)["default"], "default")
    params = hook.params
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW(twin, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(4)
    for step in (1, 2):  # the second step has momentum on entries masked now
        before = [p.detach().clone() for p in params]
        _step(model, hook, optimizer, ids, step)
        masks = [torch.rand(p.shape, generator=replay) < 0.3 for p in params]
        for p, t in zip(params, twin):
            t.grad = None
        # AdamW on g·M/p for the kept entries: run the reference on the same rescaled gradients
        loss_grads = [p.grad for p in params]
        for t, g in zip(twin, loss_grads):
            t.grad = g.clone()
        reference.step()
        for p, b, t, m in zip(params, before, twin, masks):
            assert torch.equal(p.detach()[~m], b[~m])  # decay and momentum did not touch them
            assert torch.equal(p.detach()[m], t.detach()[m])
            with torch.no_grad():
                t.copy_(p)  # the reference continues from what Child-tuning keeps
        fraction = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        assert 0.28 < fraction < 0.32


def test_masks_are_reproducible_and_resume_from_the_hook_state():
    params = [torch.nn.Parameter(torch.zeros(50, 40))]
    a, b = ct.BernoulliMasks(params, 0.4, seed=7), ct.BernoulliMasks(params, 0.4, seed=7)
    first = a.masks(1)
    assert torch.equal(first[0], b.masks(1)[0])  # every DDP process draws the same mask
    state = a.state_dict()
    nxt = a.masks(2)
    c = ct.BernoulliMasks(params, 0.4, seed=0)
    c.load_state_dict(state)
    assert torch.equal(c.masks(2)[0], nxt[0]) and not torch.equal(nxt[0], first[0])
    params[0].grad = torch.ones(50, 40)
    c.scale_grad(params[0], first[0])
    assert set(params[0].grad.unique().tolist()) <= {0.0, 2.5}  # g · M / p


def test_child_tuning_d_keeps_the_percentile_of_the_clipped_fisher_in_fishmask_form(tmp_path):
    model = make_tiny_llama()
    dt.attach(model, dt.ChildTuningDConfig(target_modules=["q_proj", "v_proj"], reserve_p=0.1, batch_size=2,
                                           fisher_clip=0.5))
    config = dt.adapter_configs(model)["default"]
    ct.d_prepass(model, config, "default", local_data(examples(6)))
    deltas = dict(dt.adapters(model)["default"].deltas(model))
    scores = fm.fisher_scores(deltas, model, local_data(examples(6)), per_example=False, batch_size=2, clip=0.5)
    flat = torch.cat([s.flatten().double() for s in scores.values()])
    threshold = torch.quantile(flat, 0.9)
    for path, delta in deltas.items():
        expected = torch.nonzero(scores[path].flatten().double() >= threshold).flatten()
        assert torch.equal(delta.fish_indices.long(), expected)
    kept = sum(dt.adapter_configs(model)["default"].kept.values())
    assert abs(kept - 0.1 * flat.numel()) <= 2  # no rescaling: values start at 0
    dt.save_adapter(model, tmp_path)
    _, tensors, _ = dt.read_adapter(tmp_path)
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"fish_indices", "fish_values"}


def test_errors_name_the_field():
    for make, field in [(lambda: dt.ChildTuningConfig(reserve_p=0), "reserve_p"),
                        (lambda: dt.ChildTuningConfig(reserve_p=1.2), "reserve_p"),
                        (lambda: dt.ChildTuningDConfig(reserve_p=-0.1), "reserve_p"),
                        (lambda: dt.ChildTuningDConfig(fisher_clip=0), "fisher_clip")]:
        with pytest.raises(dt.ConfigError, match=field):
            make()


def test_child_tuning_f_through_train_changes_weights_and_saves_them_as_full_tensors(tmp_path):
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    from deltatune.train.loop import train

    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(6)))}
    result = train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / "run"), data=data,
                   adapter={"peft_type": "CHILD_TUNING_F", "target_modules": ["mlp"], "reserve_p": 0.3},
                   max_steps=3, batch_size=2, precision="fp32", optim={"lr": 1e-3})
    _, tensors, _ = dt.read_adapter(result.adapter_dir)
    base = make_tiny_llama().state_dict()
    assert len(tensors) == 6  # gate/up/down of 2 layers: the changed tensors of a full fine-tune
    for key, value in tensors.items():
        original = base[key.removeprefix("base_model.model.")]
        changed = (value != original).float().mean()
        assert 0.3 < changed < 1.0  # 3 steps of 30% masks: some entries never moved
