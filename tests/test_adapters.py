"""Many adapters on one model: activation, deletion, disabling, mixed batches (one adapter per row), merging."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import (
    ALL_LINEAR, adapted_names, assert_unchanged, attach_random, capture_state,
    logits_alone, make_seq_cls, make_tiny_llama, no_grad_logits, random_lora,
)


# ---- many adapters ----------------------------------------------------------------------------------

def _adapter_param_ids(model, name: str) -> set[int]:
    return {id(p) for p in dt.adapter_tensors(model, name).values()}


def test_many_adapters_only_the_active_one_trains(tiny_llama):
    attach_random(tiny_llama, "a", 1)
    attach_random(tiny_llama, "b", 2, target_modules="all-linear")
    assert dt.active_adapters(tiny_llama) == ["b"]
    assert set(dt.adapter_configs(tiny_llama)) == {"a", "b"}
    for name in ("a", "b"):
        dt.set_active(tiny_llama, name)
        trainable = {id(p) for p in tiny_llama.parameters() if p.requires_grad}
        assert trainable == _adapter_param_ids(tiny_llama, name)
        count, total = dt.trainable_parameters(tiny_llama)
        assert count == sum(p.numel() for p in dt.adapter_tensors(tiny_llama, name).values()) < total
    base_params = [p for n, p in tiny_llama.named_parameters() if "lora_" not in n]
    assert base_params and not any(p.requires_grad for p in base_params)


def test_attach_without_activating_keeps_the_active_adapter(tiny_llama):
    attach_random(tiny_llama, "a", 1)
    dt.attach(tiny_llama, random_lora(), "b", activate=False)
    assert dt.active_adapters(tiny_llama) == ["a"]
    assert {id(p) for p in tiny_llama.parameters() if p.requires_grad} == _adapter_param_ids(tiny_llama, "a")


def test_two_active_adapters_add_up(tiny_llama):
    attach_random(tiny_llama, "a", 1)
    attach_random(tiny_llama, "b", 2)
    dt.set_active(tiny_llama, ["a", "b"])
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        delta = sum(layer.deltas[n].scaling * (x @ layer.deltas[n].lora_A.weight.T @ layer.deltas[n].lora_B.weight.T) for n in "ab")
        torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, atol=1e-5, rtol=1e-5)


def test_outputs_of_different_adapters_differ(tiny_llama, input_ids):
    attach_random(tiny_llama, "a", 1)
    attach_random(tiny_llama, "b", 2)
    dt.set_active(tiny_llama, "a")
    logits_a = no_grad_logits(tiny_llama, input_ids)
    dt.set_active(tiny_llama, "b")
    assert not torch.allclose(logits_a, no_grad_logits(tiny_llama, input_ids), atol=1e-3)


def test_delete_adapter_restores_the_original_modules(tiny_llama, input_ids):
    originals = {n: tiny_llama.get_submodule(n) for n in ALL_LINEAR}
    state_keys = list(tiny_llama.state_dict())
    base_logits = no_grad_logits(tiny_llama, input_ids)
    attach_random(tiny_llama, "a", 1)
    attach_random(tiny_llama, "b", 2, target_modules="all-linear")
    dt.delete_adapter(tiny_llama, "b")
    assert dt.active_adapters(tiny_llama) == ["a"]
    assert adapted_names(tiny_llama) == [n for n in ALL_LINEAR if n.endswith(("q_proj", "v_proj"))]
    layers = [m for m in tiny_llama.modules() if isinstance(m, dt.AdapterLayer)]
    assert all(set(layer.adapter_names) == {"a"} for layer in layers)
    dt.delete_adapter(tiny_llama, "a")
    assert not adapted_names(tiny_llama) and not dt.adapter_configs(tiny_llama)
    for name, module in originals.items():
        assert tiny_llama.get_submodule(name) is module and type(module) is nn.Linear
    assert list(tiny_llama.state_dict()) == state_keys
    torch.testing.assert_close(no_grad_logits(tiny_llama, input_ids), base_logits, atol=0, rtol=0)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        dt.delete_adapter(tiny_llama, "a")


def test_delete_adapter_with_modules_to_save_restores_the_original():
    model = make_seq_cls()
    head = model.score
    attach_random(model, "a", 1, modules_to_save=["score"])
    attach_random(model, "b", 2, modules_to_save=["score"])
    dt.delete_adapter(model, "a")
    assert list(model.score.modules_to_save) == ["b"]
    dt.delete_adapter(model, "b")
    assert model.score is head and not adapted_names(model)


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing(tiny_llama):
    attach_random(tiny_llama, "a", 1, modules_to_save=["embed_tokens"])  # embed_tokens comes first in module order
    dt.merge(tiny_llama)
    snapshot = capture_state(tiny_llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        dt.delete_adapter(tiny_llama, "a")
    assert_unchanged(tiny_llama, snapshot)
    dt.unmerge(tiny_llama)
    dt.delete_adapter(tiny_llama, "a")
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding and not adapted_names(tiny_llama)


# ---- disable_adapters -----------------------------------------------------------------------------

@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapters_gives_base_logits(tiny_llama, input_ids, merged):
    base_logits = no_grad_logits(tiny_llama, input_ids)
    attach_random(tiny_llama, "a", 1, modules_to_save=["lm_head"])
    with torch.no_grad():
        tiny_llama.lm_head.modules_to_save["a"].weight.add_(0.1)
    adapted = no_grad_logits(tiny_llama, input_ids)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    if merged:  # merged weights are explicit state: the base alone is refused until unmerged, never rewritten twice
        dt.merge(tiny_llama)
        weights = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
        with pytest.raises(RuntimeError, match="unmerge"):
            with dt.disable_adapters(tiny_llama):
                pass
        assert all(torch.equal(v, weights[k]) for k, v in tiny_llama.state_dict().items())
        dt.unmerge(tiny_llama)
    with dt.disable_adapters(tiny_llama):
        torch.testing.assert_close(no_grad_logits(tiny_llama, input_ids), base_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_grad_logits(tiny_llama, input_ids), adapted, atol=1e-5, rtol=1e-5)


# ---- mixed batches ----------------------------------------------------------------------------------

def _three_adapters(model):
    attach_random(model, "a", 1)
    attach_random(model, "b", 2, target_modules="all-linear")
    attach_random(model, "c", 3, target_modules=["k_proj", "down_proj"])
    return model


@pytest.mark.parametrize("names", [["b", None, "a", "b"], ["c", "a", "b", None], ["a", "a", "a", "a"]],
                         ids=["b-None-a-b", "c-a-b-None", "all-a"])
def test_route_equals_each_row_alone(names):
    model = _three_adapters(make_tiny_llama())
    ids = torch.randint(0, 256, (len(names), 8), generator=torch.Generator().manual_seed(5))
    active = dt.active_adapters(model)
    with dt.route(model, names):
        mixed = no_grad_logits(model, ids)
    assert dt.active_adapters(model) == active
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], logits_alone(model, ids[row:row + 1], name)[0], atol=1e-5, rtol=1e-5)
    # the adapters really differ, so the check above is not vacuous
    assert not torch.allclose(logits_alone(model, ids, "a"), logits_alone(model, ids, "b"), atol=1e-3)


def test_route_with_autograd_matches_inference_and_trains_only_the_routed_adapters():
    model = _three_adapters(make_tiny_llama())
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(5))
    names = ["a", None, "b"]
    with dt.route(model, names):
        reference = no_grad_logits(model, ids)  # no autograd: rows written in place
        logits = model(input_ids=ids).logits  # autograd: out of place
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=1e-6)
    logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n or n.endswith("a.weight"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".c." in n or n.endswith("c.weight"))


def test_route_with_wrong_batch_size_is_a_clear_error(tiny_llama, input_ids):
    attach_random(tiny_llama, "a", 1)
    with pytest.raises(ValueError, match="one adapter name per row"):
        with dt.route(tiny_llama, ["a", None]):
            tiny_llama(input_ids)


def test_unknown_adapter_name_lists_the_attached_ones(tiny_llama):
    attach_random(tiny_llama, "a", 1)
    attach_random(tiny_llama, "b", 2)
    for call in (lambda: dt.route(tiny_llama, ["a", "zz"]).__enter__(), lambda: dt.set_active(tiny_llama, "zz"),
                 lambda: dt.merge(tiny_llama, ["zz"]), lambda: dt.delete_adapter(tiny_llama, "zz")):
        with pytest.raises(KeyError) as info:
            call()
        assert "zz" in str(info.value) and "'a'" in str(info.value) and "'b'" in str(info.value)


def test_route_refuses_merged_adapters(tiny_llama, input_ids):
    attach_random(tiny_llama, "a", 1)
    dt.merge(tiny_llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        with dt.route(tiny_llama, ["a", None, "a"]):
            tiny_llama(input_ids)


# ---- merge / unmerge --------------------------------------------------------------------------------

def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_merge_unmerge_and_idempotence(tiny_llama, input_ids):
    attach_random(tiny_llama, "a", 1, target_modules="all-linear")
    weights = _base_weights(tiny_llama)
    unmerged = no_grad_logits(tiny_llama, input_ids)
    dt.merge(tiny_llama)
    torch.testing.assert_close(no_grad_logits(tiny_llama, input_ids), unmerged, atol=1e-5, rtol=1e-5)
    once = _base_weights(tiny_llama)
    assert any(not torch.equal(once[k], weights[k]) for k in weights)
    dt.merge(tiny_llama)
    for key, value in _base_weights(tiny_llama).items():
        assert torch.equal(value, once[key]), key
    dt.unmerge(tiny_llama)
    dt.unmerge(tiny_llama)  # unmerging an unmerged model changes nothing
    for key, value in _base_weights(tiny_llama).items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(no_grad_logits(tiny_llama, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_of_several_adapters(tiny_llama, input_ids):
    attach_random(tiny_llama, "a", 1)
    attach_random(tiny_llama, "b", 2, target_modules="all-linear")
    dt.set_active(tiny_llama, ["a", "b"])
    unmerged = no_grad_logits(tiny_llama, input_ids)
    dt.merge(tiny_llama)
    torch.testing.assert_close(no_grad_logits(tiny_llama, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_returns_plain_modules(tiny_llama, input_ids):
    state_keys = list(tiny_llama.state_dict())
    attach_random(tiny_llama, "a", 1, target_modules="all-linear")
    adapted = no_grad_logits(tiny_llama, input_ids)
    plain = dt.merge_and_unload(tiny_llama)
    assert not adapted_names(plain) and not dt.adapter_configs(plain)
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in ALL_LINEAR)
    assert list(plain.state_dict()) == state_keys
    torch.testing.assert_close(no_grad_logits(plain, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_unload_without_merge_gives_the_base_back(tiny_llama, input_ids):
    base_logits = no_grad_logits(tiny_llama, input_ids)
    attach_random(tiny_llama, "a", 1)
    dt.merge(tiny_llama)
    plain = dt.unload(tiny_llama)
    assert not adapted_names(plain)
    torch.testing.assert_close(no_grad_logits(plain, input_ids), base_logits, atol=1e-5, rtol=1e-5)


def test_safe_merge_with_nan_changes_nothing(tiny_llama):
    attach_random(tiny_llama, "a", 1, target_modules="all-linear")
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.deltas["a"].lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        dt.merge(tiny_llama, safe=True)
    for key, value in tiny_llama.state_dict().items():
        assert torch.allclose(value, before[key], equal_nan=True, atol=0, rtol=0), key
    assert all(not m.merged_adapters for m in tiny_llama.modules() if isinstance(m, dt.AdapterLayer))
    with pytest.raises(ValueError, match="NaN"):
        dt.merge_and_unload(tiny_llama, safe=True)
    assert adapted_names(tiny_llama) == ALL_LINEAR
