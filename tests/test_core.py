"""The generic core: targets, modules_to_save, bias, atomic attach (many adapters, mixing, merging: test_adapters.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import (
    ALL_LINEAR, adapted_names, assert_unchanged, attach_random, capture_state,
    logits_alone, make_seq_cls, make_tiny_llama, no_grad_logits, random_lora,
)
from deltatune.core.sites import ModulesToSave


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


# ---- targets --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("target_modules", "expected"),
    [
        (["q_proj", "v_proj"], [n for n in ALL_LINEAR if n.endswith(("q_proj", "v_proj"))]),
        (["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"]),
        (["self_attn.q_proj", "mlp.up_proj"], [n for n in ALL_LINEAR if n.endswith(("q_proj", "up_proj"))]),
        (r".*\.layers\.1\..*_proj", [n for n in ALL_LINEAR if ".1." in n]),
        (r".*(q|k)_proj", [n for n in ALL_LINEAR if n.endswith(("q_proj", "k_proj"))]),
        ("all-linear", ALL_LINEAR),
    ],
    ids=["names", "full-name", "suffix", "regex", "regex-alternation", "all-linear"],
)
def test_target_selection(tiny_llama, target_modules, expected):
    dt.attach(tiny_llama, dt.LoraConfig(target_modules=target_modules))
    assert adapted_names(tiny_llama) == expected


def test_list_entries_match_whole_name_components(tiny_llama):
    # "proj" is not a suffix of "q_proj" at a dot boundary, and a string target must match the whole name
    for target in (["proj"], "q_proj"):
        with pytest.raises(dt.TargetNotFoundError):
            dt.attach(tiny_llama, dt.LoraConfig(target_modules=target))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_all_linear_never_touches_the_output_head(tied):
    model = make_tiny_llama()
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    dt.attach(model, dt.LoraConfig(target_modules="all-linear"))
    assert type(model.lm_head) is nn.Linear
    assert adapted_names(model) == ALL_LINEAR


def test_default_targets_follow_the_architecture(tiny_llama):
    dt.attach(tiny_llama, dt.LoraConfig())
    assert adapted_names(tiny_llama) == [n for n in ALL_LINEAR if n.endswith(("q_proj", "v_proj"))]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"layers_to_transform": [1]}, ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
        ({"layers_to_transform": 0, "layers_pattern": "layers"},
         ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
        ({"layers_to_transform": [0, 1], "layers_pattern": ["layers"]},
         [n for n in ALL_LINEAR if n.endswith(("q_proj", "v_proj"))]),
        ({"exclude_modules": ["model.layers.0.self_attn.q_proj"]},
         ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
        ({"exclude_modules": r".*layers\.1\..*"},
         ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    ],
    ids=["layers", "layers-int-with-pattern", "layers-pattern-list", "exclude-name", "exclude-regex"],
)
def test_layer_and_exclude_filters(tiny_llama, kwargs, expected):
    dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj", "v_proj"], **kwargs))
    assert adapted_names(tiny_llama) == expected


def test_all_linear_with_exclude(tiny_llama):
    dt.attach(tiny_llama, dt.LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "gate_proj"]))
    assert adapted_names(tiny_llama) == [n for n in ALL_LINEAR if not n.endswith(("down_proj", "gate_proj"))]


def test_filters_that_leave_nothing_raise(tiny_llama):
    with pytest.raises(dt.TargetNotFoundError, match="within layers"):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    with pytest.raises(dt.TargetNotFoundError):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0],
                                            layers_pattern="blocks"))
    with pytest.raises(dt.TargetNotFoundError):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    assert not adapted_names(tiny_llama) and not dt.adapter_configs(tiny_llama)


def test_no_match_suggests_close_names(tiny_llama):
    with pytest.raises(dt.TargetNotFoundError) as info:
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_prj"]))
    message = str(info.value)
    assert "q_prj" in message and "q_proj" in message
    with pytest.raises(dt.TargetNotFoundError, match="up_proj"):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["upproj"]))


def test_unknown_modules_to_save_suggests_close_names(tiny_llama):
    with pytest.raises(dt.TargetNotFoundError, match="lm_head"):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))


# ---- modules_to_save ------------------------------------------------------------------------------

def test_modules_to_save_on_a_classifier_head():
    model = make_seq_cls()
    ids = torch.randint(1, 256, (3, 8), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2])
    original_weight = model.score.weight.detach().clone()
    attach_random(model, "a", 1, modules_to_save=["score"])
    head = model.score
    assert isinstance(head, ModulesToSave)
    copy = head.modules_to_save["a"]
    assert copy.weight.requires_grad and not head.original_module.weight.requires_grad
    assert copy.weight is not head.original_module.weight
    assert "base_model.model.score.weight" in dt.adapter_tensors(model, "a")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert not torch.equal(copy.weight, original_weight)
    assert torch.equal(head.original_module.weight, original_weight)
    # a second adapter gets its own copy; rows route to their own head
    attach_random(model, "b", 2, modules_to_save=["score"])
    with torch.no_grad():
        head.modules_to_save["b"].weight.add_(0.5)
        names = ["b", None, "a"]
        with dt.route(model, names):
            mixed = model(ids).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(mixed[row], logits_alone(model, ids[row:row + 1], name)[0], atol=1e-5, rtol=1e-5)
        with dt.disable_adapters(model):
            base_head = model(ids).logits
    fresh = make_seq_cls()
    with torch.no_grad():
        torch.testing.assert_close(base_head, fresh(ids).logits, atol=1e-5, rtol=1e-5)
    dt.set_active(model, "b")
    adapted = no_grad_logits(model, ids)
    plain = dt.merge_and_unload(model)  # keeps the active adapter's copy of the head
    assert type(plain.score) is nn.Linear and not adapted_names(plain)
    torch.testing.assert_close(no_grad_logits(plain, ids), adapted, atol=1e-5, rtol=1e-5)


def test_modules_to_save_are_never_targets():
    model = make_seq_cls()
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["score"]))
    assert isinstance(model.score, ModulesToSave) and type(model.score.original_module) is nn.Linear
    assert adapted_names(model) == ALL_LINEAR


def test_modules_to_save_cannot_hold_another_adapters_layer(tiny_llama):
    attach_random(tiny_llama, "a", 1, target_modules=["q_proj"])
    snapshot = capture_state(tiny_llama)
    for saved in (["q_proj"], ["layers.0.self_attn"]):
        with pytest.raises(dt.ConfigError, match="modules_to_save"):
            dt.attach(tiny_llama, random_lora(target_modules=["v_proj"], modules_to_save=saved), "b")
        assert_unchanged(tiny_llama, snapshot)


# ---- bias -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_make_the_right_biases_trainable(bias):
    model = _tiny_gpt2()
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["c_attn"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 4
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    expected = {"none": set(), "all": biases,
                "lora_only": {n for n in biases if n.endswith("c_attn.base_layer.bias")}}[bias]
    assert trainable - lora == expected
    if bias == "lora_only":
        assert len(expected) == 2
    saved = set(dt.adapter_tensors(model, "default"))
    assert {k for k in saved if k.endswith(".bias")} == {f"base_model.model.{n}" for n in expected}


def test_bias_all_keeps_the_original_of_a_saved_module_frozen():
    model = _tiny_gpt2()
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["c_attn"], bias="all", modules_to_save=["ln_f"]))
    head = model.transformer.ln_f
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert model.transformer.h[0].ln_1.bias.requires_grad


# ---- atomic attach and adapter names ----------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": r"model\.layers\.0\.(self_attn\.q_proj|input_layernorm)"},  # LayerNorm is unsupported
        {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["no_such_head"]},  # fails after injection
        {"target_modules": ["q_proj"], "modules_to_save": ["q_proj"]},  # a target cannot also be a saved copy
    ],
    ids=["unsupported-module", "missing-modules-to-save", "target-and-saved"],
)
@pytest.mark.parametrize("with_existing", [False, True], ids=["fresh", "existing-adapter"])
def test_failed_attach_leaves_the_model_unchanged(kwargs, with_existing):
    model = make_tiny_llama()
    if with_existing:
        attach_random(model, "first", 1, target_modules="all-linear", modules_to_save=["lm_head"])
    snapshot = capture_state(model)
    with pytest.raises((dt.TargetNotFoundError, dt.ConfigError, ValueError)):
        dt.attach(model, dt.LoraConfig(r=4, **kwargs), "second")
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("name", ["a.b", "", "with space", "1abc"])
def test_bad_adapter_names_are_rejected(tiny_llama, name):
    with pytest.raises(ValueError, match="adapter name"):
        dt.attach(tiny_llama, random_lora(), name)
    assert not adapted_names(tiny_llama)


def test_duplicate_adapter_name_is_rejected(tiny_llama):
    attach_random(tiny_llama, "a", 1)
    snapshot = capture_state(tiny_llama)
    with pytest.raises(ValueError, match="already attached"):
        dt.attach(tiny_llama, random_lora(target_modules="all-linear"), "a")
    assert_unchanged(tiny_llama, snapshot)


def test_attach_rejects_a_non_config(tiny_llama):
    with pytest.raises(TypeError, match="AdapterConfig"):
        dt.attach(tiny_llama, {"r": 4})  # type: ignore[arg-type]
