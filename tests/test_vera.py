"""VeRA against the formula and the real peft package (files both ways, with and without the projections),
the shared pair (generated as peft does, shared only where peft's values are equal), merge_and_unload, mixed
batches with LoRA rows, the LoRA export, and a file whose projections do not match its key."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from conftest import assert_mixed_equals_alone, assert_unchanged, capture_state, make_tiny_llama, no_grad_logits
from deltatune.methods.vera import VeraProjections, projections

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_vera(tmp_path, **kwargs):
    torch.manual_seed(7)
    theirs = _quiet(peft.get_peft_model, make_tiny_llama(), peft.VeraConfig(r=8, init_weights=False,
                                                                             target_modules=TARGETS, **kwargs)).eval()
    _quiet(theirs.save_pretrained, str(tmp_path / "peft"))
    return theirs


def _parts(model):
    return dict(model.deltatune_parts.items())


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_files_both_ways(save_projection, input_ids, tmp_path):
    theirs = _peft_vera(tmp_path, save_projection=save_projection, projection_prng_key=3)
    ours = dt.load_adapter(make_tiny_llama(), tmp_path / "peft")
    expected = no_grad_logits(theirs, input_ids)
    torch.testing.assert_close(no_grad_logits(ours, input_ids), expected, atol=1e-6, rtol=1e-6)
    dt.save_adapter(ours, tmp_path / "ours")
    keys = set(dt.read_adapter(tmp_path / "ours")[1])
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    back = _quiet(peft.PeftModel.from_pretrained, make_tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(no_grad_logits(back, input_ids), expected, atol=1e-6, rtol=1e-6)


def test_forward_formula_init_and_parameter_count(input_ids):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    dt.attach(model, dt.VeraConfig(r=16, target_modules=TARGETS))
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)  # λ_b = 0
    A, B = projections(0, 16, 64, 128)  # largest (d_out, d_in): down_proj's in, q_proj's out
    part = _parts(model)["default"]
    assert torch.equal(part.vera_A, A) and torch.equal(part.vera_B, B)
    site = model.get_submodule("model.layers.0.self_attn.v_proj")  # (32, 64): a slice of both
    d = site.deltas["default"]
    assert torch.equal(d.vera_lambda_d, torch.full((16,), 0.1))
    with torch.no_grad():
        d.vera_lambda_b.normal_()
        x = torch.randn(4, 64)
        expected = site.base_layer(x) + d.vera_lambda_b * ((d.vera_lambda_d * (x @ A[:, :64].T)) @ B[:32].T)
        torch.testing.assert_close(site(x), expected)
    trainable, _ = dt.trainable_parameters(model)
    assert trainable == 2 * ((16 + 64) + (16 + 32) + (16 + 64))  # Σ (r + d_out) over the 6 layers


def test_two_adapters_share_a_pair_only_where_peft_values_are_equal():
    model = make_tiny_llama()
    dt.attach(model, dt.VeraConfig(r=8, target_modules=TARGETS), "a")
    dt.attach(model, dt.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]), "same")  # same largest shapes
    dt.attach(model, dt.VeraConfig(r=8, target_modules=["q_proj"]), "smaller")  # largest (64, 64)
    dt.attach(model, dt.VeraConfig(r=8, projection_prng_key=1, target_modules=TARGETS), "other_key")
    dt.attach(model, dt.VeraConfig(r=4, target_modules=TARGETS), "other_r")
    parts = _parts(model)
    ptr = {n: p.vera_A.data_ptr() for n, p in parts.items()}
    assert ptr["same"] == ptr["a"]
    assert len({ptr["a"], ptr["smaller"], ptr["other_key"], ptr["other_r"]}) == 4
    dt.delete_adapter(model, "a")  # the sharer keeps its tensors
    assert torch.equal(parts["same"].vera_A, projections(0, 8, 64, 128)[0])


def test_projections_that_do_not_match_the_key_are_refused(tmp_path):
    model = make_tiny_llama()
    dt.attach(model, dt.VeraConfig(r=8, target_modules=TARGETS))
    dt.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.01
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    target = make_tiny_llama()
    dt.attach(target, dt.VeraConfig(r=8, target_modules=TARGETS), "resident")  # would share the pair
    saved = capture_state(target)
    with pytest.raises(dt.AdapterFileError, match="vera_A does not match projection_prng_key=0"):
        dt.load_adapter(target, tmp_path, "bad")
    assert_unchanged(target, saved)
    with pytest.raises(ValueError, match="does not match projection_prng_key"):
        dt.set_adapter_tensors(target, "resident", {"base_model.vera_A": tensors["base_model.vera_A"]}, strict=False)


def test_merge_and_unload_mixed_batch_and_lora_export(input_ids, tmp_path):
    model = make_tiny_llama()
    torch.manual_seed(3)
    dt.attach(model, dt.VeraConfig(r=8, init_weights=False, target_modules=TARGETS), "vera")
    dt.attach(model, dt.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]), "lora")
    assert_mixed_equals_alone(model, torch.cat([input_ids, input_ids[:1]]), ["vera", "lora", None, "vera"])
    dt.set_active(model, "vera")
    expected = no_grad_logits(model, input_ids)
    dt.save_as_lora(model, tmp_path / "lora", "vera")
    config = dt.read_adapter(tmp_path / "lora")[0]
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 8, 8)
    as_lora = _quiet(peft.PeftModel.from_pretrained, make_tiny_llama(), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(no_grad_logits(as_lora, input_ids), expected, atol=1e-5, rtol=1e-5)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    plain = dt.merge_and_unload(model)
    assert not hasattr(plain, "deltatune_parts")
    torch.testing.assert_close(no_grad_logits(plain, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_bad_config_is_named():
    with pytest.raises(dt.ConfigError, match="bias='all'"):
        dt.VeraConfig(bias="all")
    with pytest.raises(dt.ConfigError, match="vera_dropout"):
        dt.VeraConfig(vera_dropout=1.0)
    assert isinstance(VeraProjections, type)


def test_inspect_describes_and_check_file_refuses_a_wrong_r(tmp_path, capsys):
    from deltatune.cli import main

    model = make_tiny_llama()
    dt.attach(model, dt.VeraConfig(r=8, target_modules=TARGETS))
    dt.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) in (0, None)
    out = capsys.readouterr().out
    assert "6 adapted (e.g. model.layers.0.mlp.down_proj)" in out and "saved in the file" in out
    config, tensors, _ = dt.read_adapter(tmp_path)
    problem = config.replace(r=4).check_file({k.removeprefix("base_model.model."): t for k, t in tensors.items()})
    assert "base_model.vera_A has shape (8, 128), but r=4" in problem
