"""LoKr against the formula and the real peft package (files both ways, every factor layout), merge, mixed
batches, and the options it refuses."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, make_tiny_llama, no_grad_logits
from deltatune.methods.lokr import factorization

peft = pytest.importorskip("peft")


def _peft_model(config):
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make_tiny_llama(), config).eval()


def _peft_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make_tiny_llama(), str(path)).eval()


CONFIGS = [
    dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),  # both factors full (r ≥ max(k, n)/2)
    dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),  # W2 low-rank
    dict(r=1, alpha=2, decompose_both=True, target_modules=["q_proj", "up_proj"]),  # W1 low-rank too
    dict(r=2, alpha=3, decompose_factor=4, rank_pattern={"v_proj": 1}, alpha_pattern={"q_proj": 5.0},
         target_modules=["q_proj", "v_proj"]),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_peft_files_both_ways(kwargs, input_ids, tmp_path):
    theirs = _peft_model(peft.LoKrConfig(init_weights=False, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "peft"))
    ours = dt.load_adapter(make_tiny_llama(), tmp_path / "peft")
    expected = no_grad_logits(theirs, input_ids)
    torch.testing.assert_close(no_grad_logits(ours, input_ids), expected, atol=1e-5, rtol=1e-5)
    dt.save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(no_grad_logits(_peft_load(tmp_path / "ours"), input_ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_init_is_identity_with_peft_shapes(init, input_ids):
    ours = make_tiny_llama()
    base = no_grad_logits(ours, input_ids)
    config = dict(r=2, target_modules=["q_proj", "v_proj"], decompose_both=True, init_weights=init)
    dt.attach(ours, dt.LoKrConfig(**config))
    torch.testing.assert_close(no_grad_logits(ours, input_ids), base, atol=0, rtol=0)
    theirs = _peft_model(peft.LoKrConfig(**config))
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if "lokr_" in k}
    ours_shapes = {k.replace("base_model.model.", "base_model.model.", 1): tuple(v.shape)
                   for k, v in dt.adapter_tensors(ours, "default").items()}
    assert {k.replace(".default", "") for k in shapes} == set(ours_shapes)
    assert all(ours_shapes[k.replace(".default", "")] == s for k, s in shapes.items())


def test_forward_matches_the_kronecker_formula():
    model = make_tiny_llama()
    dt.attach(model, dt.LoKrConfig(r=2, alpha=6, init_weights=False, target_modules=["v_proj"]))
    site = model.get_submodule("model.layers.1.self_attn.v_proj")  # 64 -> 32: (4, 8) x (8, 8)
    d = site.deltas["default"]
    assert factorization(32) == (4, 8) and tuple(d.lokr_w1.shape) == (4, 8)
    x = torch.randn(3, 64)
    with torch.no_grad():
        dw = 3.0 * torch.kron(d.lokr_w1, d.lokr_w2_a @ d.lokr_w2_b)
        torch.testing.assert_close(site(x), site.base_layer(x) + x @ dw.T)


def test_merge_and_mixed_batch(input_ids):
    model = make_tiny_llama()
    torch.manual_seed(2)
    dt.attach(model, dt.LoKrConfig(r=2, init_weights=False, target_modules="all-linear"), "a")
    dt.attach(model, dt.LoHaConfig(r=2, init_weights=False, target_modules=["q_proj"]), "b")
    assert_mixed_equals_alone(model, torch.cat([input_ids, input_ids[:1]]), ["a", "b", None, "a"])
    unmerged = no_grad_logits(model, input_ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_bad_options_are_named():
    with pytest.raises(dt.ConfigError, match="decompose_factor"):
        dt.LoKrConfig(decompose_factor=0)
    with pytest.raises(dt.ConfigError, match="init_weights"):
        dt.LoKrConfig(init_weights="gaussian")
    with pytest.raises(dt.ConfigError, match="use_effective_conv2d"):
        dt.LoKrConfig(use_effective_conv2d=True)
    with pytest.raises(dt.TargetNotFoundError, match="LOKR cannot be applied"):
        dt.attach(make_tiny_llama(), dt.LoKrConfig(target_modules=["embed_tokens"]))


def test_svd_export_to_plain_lora(input_ids, tmp_path):
    model = make_tiny_llama()
    torch.manual_seed(6)
    dt.attach(model, dt.LoKrConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    full = dt.save_as_lora(model, tmp_path / "full", rank=64)  # full rank: exact
    assert max(full.errors.values()) < 1e-5
    loaded = dt.load_adapter(make_tiny_llama(), full.path)
    torch.testing.assert_close(no_grad_logits(loaded, input_ids), no_grad_logits(model, input_ids), atol=1e-4, rtol=1e-4)
    assert 0 < max(dt.save_as_lora(model, tmp_path / "r2", rank=2).errors.values()) < 1


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_rescales_kept_rows_only_with_rank_dropout_scale(scale):
    model = make_tiny_llama()
    torch.manual_seed(0)
    dt.attach(model, dt.LoKrConfig(r=2, init_weights=False, rank_dropout=0.5, rank_dropout_scale=scale,
                                   target_modules=["q_proj"]))
    site = model.get_submodule("model.layers.0.self_attn.q_proj")
    d = site.deltas["default"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        full, base = x @ d.delta_weight().T, site.base_layer(x)
        site.train()
        out = site(x) - base
    kept = [j for j in range(64) if not torch.allclose(out[:, j], torch.zeros(3))]
    assert 0 < len(kept) < 64
    factor = 64 / len(kept) if scale else 1.0
    torch.testing.assert_close(out[:, kept], full[:, kept] * factor, atol=1e-5, rtol=1e-4)
