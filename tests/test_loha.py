"""LoHa against the formula and the real peft package (files both ways), merge, mixed batches, its dropouts,
and the module types it refuses."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, assert_unchanged, capture_state, make_tiny_llama, no_grad_logits

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


def _save_peft(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))


CONFIGS = [
    dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, alpha=3, target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"down_proj": 3},
         alpha_pattern={"k_proj": 5.0}),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_peft_files_both_ways(kwargs, input_ids, tmp_path):
    theirs = _peft_model(peft.LoHaConfig(init_weights=False, **kwargs))
    _save_peft(theirs, tmp_path / "peft")
    ours = dt.load_adapter(make_tiny_llama(), tmp_path / "peft")
    expected = no_grad_logits(theirs, input_ids)
    torch.testing.assert_close(no_grad_logits(ours, input_ids), expected, atol=1e-5, rtol=1e-5)
    dt.save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(no_grad_logits(_peft_load(tmp_path / "ours"), input_ids), expected, atol=1e-5, rtol=1e-5)


def test_forward_matches_formula_and_starts_at_identity(input_ids):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    dt.attach(model, dt.LoHaConfig(r=3, alpha=6, target_modules=["q_proj"]))
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)  # W2b = 0
    site = model.get_submodule("model.layers.0.self_attn.q_proj")
    d = site.deltas["default"]
    with torch.no_grad():
        d.hada_w2_b.normal_()
        x = torch.randn(5, 64)
        dw = 2.0 * (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b)
        torch.testing.assert_close(site(x), site.base_layer(x) + x @ dw.T)


def test_merge_and_mixed_batch_with_lora_rows(input_ids):
    model = make_tiny_llama()
    torch.manual_seed(1)
    dt.attach(model, dt.LoHaConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj", "up_proj"]), "loha")
    dt.attach(model, dt.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]), "lora")
    ids = torch.cat([input_ids, input_ids[:1]])
    assert_mixed_equals_alone(model, ids, ["loha", "lora", None, "loha"])
    dt.set_active(model, ["loha", "lora"])
    unmerged = no_grad_logits(model, input_ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), unmerged, atol=1e-5, rtol=1e-5)
    merged = dt.merge_and_unload(model)
    torch.testing.assert_close(no_grad_logits(merged, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_unsupported_modules_and_options_are_refused_before_anything_changes():
    model = make_tiny_llama()
    saved = capture_state(model)
    with pytest.raises(Exception, match="embed_tokens"):
        dt.attach(model, dt.LoHaConfig(target_modules=["embed_tokens"]))
    assert_unchanged(model, saved)
    with pytest.raises(dt.ConfigError, match="use_effective_conv2d=True applies to Conv layers"):
        dt.LoHaConfig(use_effective_conv2d=True)
    with pytest.raises(dt.ConfigError, match="rank_dropout"):
        dt.LoHaConfig(rank_dropout=1.5)


def test_rank_and_module_dropout_in_training_only():
    model = make_tiny_llama()
    torch.manual_seed(0)
    dt.attach(model, dt.LoHaConfig(r=2, init_weights=False, rank_dropout=0.5, module_dropout=0.5,
                                   target_modules=["q_proj"]))
    site = model.get_submodule("model.layers.0.self_attn.q_proj")
    d = site.deltas["default"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        full = x @ d.delta_weight().T
        base = site.base_layer(x)
        site.train()
        outcomes = set()
        for _ in range(30):
            out = site(x) - base
            if torch.allclose(out, torch.zeros_like(out)):
                outcomes.add("skipped")
                continue
            kept = [j for j in range(64) if not torch.allclose(out[:, j], torch.zeros(3))]
            scale = out[:, kept[0]] / full[:, kept[0]]
            torch.testing.assert_close(out[:, kept], full[:, kept] * scale[:1], atol=1e-5, rtol=1e-4)
            assert torch.allclose(scale, torch.full_like(scale, 64 / len(kept)), rtol=1e-4)  # 1/mean of kept rows
            outcomes.add("dropped rows")
        assert outcomes == {"skipped", "dropped rows"}
        site.eval()
        torch.testing.assert_close(site(x), base + full)


def test_svd_export_to_plain_lora_reports_its_error(input_ids, tmp_path):
    model = make_tiny_llama()
    torch.manual_seed(5)
    dt.attach(model, dt.LoHaConfig(r=2, init_weights=False, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="pass rank=k for its truncated SVD"):
        dt.save_as_lora(model, tmp_path / "refused")
    exact = dt.save_as_lora(model, tmp_path / "r4", rank=4)  # (W1a W1b) ⊙ (W2a W2b) has rank <= 2·2
    assert max(exact.errors.values()) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(exact.path)).eval()
    torch.testing.assert_close(no_grad_logits(theirs, input_ids), no_grad_logits(model, input_ids), atol=1e-4, rtol=1e-4)
    cut = dt.save_as_lora(model, tmp_path / "r1", rank=1)
    site = "model.layers.0.self_attn.q_proj"
    dw = model.get_submodule(site).deltas["default"].delta_weight().detach()
    s = torch.linalg.svdvals(dw)
    assert cut.errors[site] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)  # Eckart-Young
    assert dt.read_adapter(cut.path)[0].r == 1


@pytest.mark.parametrize("config", [
    dt.LoHaConfig(r=2, init_weights=False, target_modules="all-linear"),
    dt.LoKrConfig(r=2, init_weights=False, target_modules="all-linear"),
    dt.VeraConfig(r=8, init_weights=False, target_modules="all-linear"),
], ids=["loha", "lokr", "vera"])
def test_on_a_4bit_base_equals_the_dequantized_base(config, input_ids, tmp_path):
    quant = pytest.importorskip("deltatune.quant")
    model = make_tiny_llama()
    quant.quantize_model(model, compute_dtype=torch.float32)
    torch.manual_seed(3)
    dt.attach(model, config)
    dt.save_adapter(model, tmp_path)
    reference = dt.load_adapter(quant.dequantize_model(make_tiny_llama_quantized(quant)), tmp_path)
    torch.testing.assert_close(no_grad_logits(model, input_ids), no_grad_logits(reference, input_ids), atol=1e-5, rtol=1e-5)
    merged = dt.merge_and_unload(model)  # a quantized base merges into dequantized Linears
    torch.testing.assert_close(no_grad_logits(merged, input_ids), no_grad_logits(reference, input_ids), atol=1e-4, rtol=1e-4)


def make_tiny_llama_quantized(quant):
    model = make_tiny_llama()
    quant.quantize_model(model, compute_dtype=torch.float32)
    return model


def test_hadamard_backward_equals_autograd_of_the_formula():
    from deltatune.methods.loha import _Hadamard

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 3), (3, 4), (5, 3), (3, 4))]
    assert torch.autograd.gradcheck(_Hadamard.apply, factors)
