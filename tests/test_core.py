"""The generic core: targets, many adapters, disabling, mixed batches, merging, modules_to_save, bias, atomicity."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_tiny_llama, assert_unchanged, capture_state
from deltatune.core.layer import ModulesToSave

ALL_LINEAR = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _targets(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, dt.AdapterLayer)]


def _lora(**kwargs) -> dt.LoraConfig:
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    kwargs.setdefault("init_lora_weights", False)  # A and B random: each adapter changes the output
    return dt.LoraConfig(r=4, lora_alpha=8, **kwargs)


def _attach(model, name: str, seed: int, **kwargs):
    config = _lora(**kwargs)
    torch.manual_seed(seed)
    return dt.attach(model, config, name)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _make_seq_cls(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


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
    assert _targets(tiny_llama) == expected


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
    assert _targets(model) == ALL_LINEAR


def test_default_targets_follow_the_architecture(tiny_llama):
    dt.attach(tiny_llama, dt.LoraConfig())
    assert _targets(tiny_llama) == [n for n in ALL_LINEAR if n.endswith(("q_proj", "v_proj"))]


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
    assert _targets(tiny_llama) == expected


def test_all_linear_with_exclude(tiny_llama):
    dt.attach(tiny_llama, dt.LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "gate_proj"]))
    assert _targets(tiny_llama) == [n for n in ALL_LINEAR if not n.endswith(("down_proj", "gate_proj"))]


def test_filters_that_leave_nothing_raise(tiny_llama):
    with pytest.raises(dt.TargetNotFoundError, match="within layers"):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    with pytest.raises(dt.TargetNotFoundError):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0],
                                            layers_pattern="blocks"))
    with pytest.raises(dt.TargetNotFoundError):
        dt.attach(tiny_llama, dt.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    assert not _targets(tiny_llama) and not dt.adapter_configs(tiny_llama)


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


# ---- many adapters ----------------------------------------------------------------------------------

def _adapter_param_ids(model, name: str) -> set[int]:
    return {id(p) for p in dt.adapter_tensors(model, name).values()}


def test_many_adapters_only_the_active_one_trains(tiny_llama):
    _attach(tiny_llama, "a", 1)
    _attach(tiny_llama, "b", 2, target_modules="all-linear")
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
    _attach(tiny_llama, "a", 1)
    dt.attach(tiny_llama, _lora(), "b", activate=False)
    assert dt.active_adapters(tiny_llama) == ["a"]
    assert {id(p) for p in tiny_llama.parameters() if p.requires_grad} == _adapter_param_ids(tiny_llama, "a")


def test_two_active_adapters_add_up(tiny_llama):
    _attach(tiny_llama, "a", 1)
    _attach(tiny_llama, "b", 2)
    dt.set_active(tiny_llama, ["a", "b"])
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        delta = sum(layer.scaling[n] * (x @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T) for n in "ab")
        torch.testing.assert_close(layer(x), layer.base_layer(x) + delta, atol=1e-5, rtol=1e-5)


def test_outputs_of_different_adapters_differ(tiny_llama, input_ids):
    _attach(tiny_llama, "a", 1)
    _attach(tiny_llama, "b", 2)
    dt.set_active(tiny_llama, "a")
    logits_a = _logits(tiny_llama, input_ids)
    dt.set_active(tiny_llama, "b")
    assert not torch.allclose(logits_a, _logits(tiny_llama, input_ids), atol=1e-3)


def test_delete_adapter_restores_the_original_modules(tiny_llama, input_ids):
    originals = {n: tiny_llama.get_submodule(n) for n in ALL_LINEAR}
    state_keys = list(tiny_llama.state_dict())
    base_logits = _logits(tiny_llama, input_ids)
    _attach(tiny_llama, "a", 1)
    _attach(tiny_llama, "b", 2, target_modules="all-linear")
    dt.delete_adapter(tiny_llama, "b")
    assert dt.active_adapters(tiny_llama) == ["a"]
    assert _targets(tiny_llama) == [n for n in ALL_LINEAR if n.endswith(("q_proj", "v_proj"))]
    layers = [m for m in tiny_llama.modules() if isinstance(m, dt.AdapterLayer)]
    assert all(set(layer.adapter_names) == {"a"} for layer in layers)
    dt.delete_adapter(tiny_llama, "a")
    assert not _targets(tiny_llama) and not dt.adapter_configs(tiny_llama)
    for name, module in originals.items():
        assert tiny_llama.get_submodule(name) is module and type(module) is nn.Linear
    assert list(tiny_llama.state_dict()) == state_keys
    torch.testing.assert_close(_logits(tiny_llama, input_ids), base_logits, atol=0, rtol=0)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        dt.delete_adapter(tiny_llama, "a")


def test_delete_adapter_with_modules_to_save_restores_the_original():
    model = _make_seq_cls()
    head = model.score
    _attach(model, "a", 1, modules_to_save=["score"])
    _attach(model, "b", 2, modules_to_save=["score"])
    dt.delete_adapter(model, "a")
    assert list(model.score.modules_to_save) == ["b"]
    dt.delete_adapter(model, "b")
    assert model.score is head and not _targets(model)


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing(tiny_llama):
    _attach(tiny_llama, "a", 1, modules_to_save=["embed_tokens"])  # embed_tokens comes first in module order
    dt.merge(tiny_llama)
    snapshot = capture_state(tiny_llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        dt.delete_adapter(tiny_llama, "a")
    assert_unchanged(tiny_llama, snapshot)
    dt.unmerge(tiny_llama)
    dt.delete_adapter(tiny_llama, "a")
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding and not _targets(tiny_llama)


# ---- disable_adapters -----------------------------------------------------------------------------

@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapters_gives_base_logits(tiny_llama, input_ids, merged):
    base_logits = _logits(tiny_llama, input_ids)
    _attach(tiny_llama, "a", 1, modules_to_save=["lm_head"])
    with torch.no_grad():
        tiny_llama.lm_head.modules_to_save["a"].weight.add_(0.1)
    adapted = _logits(tiny_llama, input_ids)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    if merged:
        dt.merge(tiny_llama)
    with dt.disable_adapters(tiny_llama):
        torch.testing.assert_close(_logits(tiny_llama, input_ids), base_logits, atol=1e-5, rtol=1e-5)
    layers = [m for m in tiny_llama.modules() if isinstance(m, dt.AdapterLayer)]
    assert all(layer.merged_adapters == (["a"] if merged else []) for layer in layers)
    torch.testing.assert_close(_logits(tiny_llama, input_ids), adapted, atol=1e-5, rtol=1e-5)


# ---- mixed batches ----------------------------------------------------------------------------------

def _three_adapters(model):
    _attach(model, "a", 1)
    _attach(model, "b", 2, target_modules="all-linear")
    _attach(model, "c", 3, target_modules=["k_proj", "down_proj"])
    return model


def _alone(model, ids, name):
    previous = dt.active_adapters(model)
    if name is None:
        with dt.disable_adapters(model):
            out = _logits(model, ids)
    else:
        dt.set_active(model, name)
        out = _logits(model, ids)
    dt.set_active(model, previous)
    return out


@pytest.mark.parametrize("names", [["b", None, "a", "b"], ["c", "a", "b", None], ["a", "a", "a", "a"]],
                         ids=["b-None-a-b", "c-a-b-None", "all-a"])
def test_route_equals_each_row_alone(names):
    model = _three_adapters(make_tiny_llama())
    ids = torch.randint(0, 256, (len(names), 8), generator=torch.Generator().manual_seed(5))
    active = dt.active_adapters(model)
    with dt.route(model, names):
        mixed = _logits(model, ids)
    assert dt.active_adapters(model) == active
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], _alone(model, ids[row:row + 1], name)[0], atol=1e-5, rtol=1e-5)
    # the adapters really differ, so the check above is not vacuous
    assert not torch.allclose(_alone(model, ids, "a"), _alone(model, ids, "b"), atol=1e-3)


def test_route_with_autograd_matches_inference_and_trains_only_the_routed_adapters():
    model = _three_adapters(make_tiny_llama())
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(5))
    names = ["a", None, "b"]
    with dt.route(model, names):
        reference = _logits(model, ids)  # no autograd: rows written in place
        logits = model(input_ids=ids).logits  # autograd: out of place
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=1e-6)
    logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n or n.endswith("a.weight"))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".c." in n or n.endswith("c.weight"))


def test_route_with_wrong_batch_size_is_a_clear_error(tiny_llama, input_ids):
    _attach(tiny_llama, "a", 1)
    with pytest.raises(ValueError, match="one adapter name per row"):
        with dt.route(tiny_llama, ["a", None]):
            tiny_llama(input_ids)


def test_unknown_adapter_name_lists_the_attached_ones(tiny_llama):
    _attach(tiny_llama, "a", 1)
    _attach(tiny_llama, "b", 2)
    for call in (lambda: dt.route(tiny_llama, ["a", "zz"]).__enter__(), lambda: dt.set_active(tiny_llama, "zz"),
                 lambda: dt.merge(tiny_llama, ["zz"]), lambda: dt.delete_adapter(tiny_llama, "zz")):
        with pytest.raises(KeyError) as info:
            call()
        assert "zz" in str(info.value) and "'a'" in str(info.value) and "'b'" in str(info.value)


def test_route_refuses_merged_adapters(tiny_llama, input_ids):
    _attach(tiny_llama, "a", 1)
    dt.merge(tiny_llama)
    with pytest.raises(RuntimeError, match="unmerge"):
        with dt.route(tiny_llama, ["a", None, "a"]):
            tiny_llama(input_ids)


# ---- merge / unmerge --------------------------------------------------------------------------------

def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_merge_unmerge_and_idempotence(tiny_llama, input_ids):
    _attach(tiny_llama, "a", 1, target_modules="all-linear")
    weights = _base_weights(tiny_llama)
    unmerged = _logits(tiny_llama, input_ids)
    dt.merge(tiny_llama)
    torch.testing.assert_close(_logits(tiny_llama, input_ids), unmerged, atol=1e-5, rtol=1e-5)
    once = _base_weights(tiny_llama)
    assert any(not torch.equal(once[k], weights[k]) for k in weights)
    dt.merge(tiny_llama)
    for key, value in _base_weights(tiny_llama).items():
        assert torch.equal(value, once[key]), key
    dt.unmerge(tiny_llama)
    dt.unmerge(tiny_llama)  # unmerging an unmerged model changes nothing
    for key, value in _base_weights(tiny_llama).items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_logits(tiny_llama, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_of_several_adapters(tiny_llama, input_ids):
    _attach(tiny_llama, "a", 1)
    _attach(tiny_llama, "b", 2, target_modules="all-linear")
    dt.set_active(tiny_llama, ["a", "b"])
    unmerged = _logits(tiny_llama, input_ids)
    dt.merge(tiny_llama)
    torch.testing.assert_close(_logits(tiny_llama, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_returns_plain_modules(tiny_llama, input_ids):
    state_keys = list(tiny_llama.state_dict())
    _attach(tiny_llama, "a", 1, target_modules="all-linear")
    adapted = _logits(tiny_llama, input_ids)
    plain = dt.merge_and_unload(tiny_llama)
    assert not _targets(plain) and not dt.adapter_configs(plain)
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in ALL_LINEAR)
    assert list(plain.state_dict()) == state_keys
    torch.testing.assert_close(_logits(plain, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_unload_without_merge_gives_the_base_back(tiny_llama, input_ids):
    base_logits = _logits(tiny_llama, input_ids)
    _attach(tiny_llama, "a", 1)
    dt.merge(tiny_llama)
    plain = dt.unload(tiny_llama)
    assert not _targets(plain)
    torch.testing.assert_close(_logits(plain, input_ids), base_logits, atol=1e-5, rtol=1e-5)


def test_safe_merge_with_nan_changes_nothing(tiny_llama):
    _attach(tiny_llama, "a", 1, target_modules="all-linear")
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.lora_B["a"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        dt.merge(tiny_llama, safe=True)
    for key, value in tiny_llama.state_dict().items():
        assert torch.allclose(value, before[key], equal_nan=True, atol=0, rtol=0), key
    assert all(not m.merged_adapters for m in tiny_llama.modules() if isinstance(m, dt.AdapterLayer))
    with pytest.raises(ValueError, match="NaN"):
        dt.merge_and_unload(tiny_llama, safe=True)
    assert _targets(tiny_llama) == ALL_LINEAR


# ---- modules_to_save ------------------------------------------------------------------------------

def test_modules_to_save_on_a_classifier_head():
    model = _make_seq_cls()
    ids = torch.randint(1, 256, (3, 8), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2])
    original_weight = model.score.weight.detach().clone()
    _attach(model, "a", 1, modules_to_save=["score"])
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
    _attach(model, "b", 2, modules_to_save=["score"])
    with torch.no_grad():
        head.modules_to_save["b"].weight.add_(0.5)
        names = ["b", None, "a"]
        with dt.route(model, names):
            mixed = model(ids).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(mixed[row], _alone(model, ids[row:row + 1], name)[0], atol=1e-5, rtol=1e-5)
        with dt.disable_adapters(model):
            base_head = model(ids).logits
    fresh = _make_seq_cls()
    with torch.no_grad():
        torch.testing.assert_close(base_head, fresh(ids).logits, atol=1e-5, rtol=1e-5)
    dt.set_active(model, "b")
    adapted = _logits(model, ids)
    plain = dt.merge_and_unload(model)  # keeps the active adapter's copy of the head
    assert type(plain.score) is nn.Linear and not _targets(plain)
    torch.testing.assert_close(_logits(plain, ids), adapted, atol=1e-5, rtol=1e-5)


def test_modules_to_save_are_never_targets():
    model = _make_seq_cls()
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["score"]))
    assert isinstance(model.score, ModulesToSave) and type(model.score.original_module) is nn.Linear
    assert _targets(model) == ALL_LINEAR


def test_modules_to_save_cannot_hold_another_adapters_layer(tiny_llama):
    _attach(tiny_llama, "a", 1, target_modules=["q_proj"])
    snapshot = capture_state(tiny_llama)
    for saved in (["q_proj"], ["layers.0.self_attn"]):
        with pytest.raises(dt.ConfigError, match="modules_to_save"):
            dt.attach(tiny_llama, _lora(target_modules=["v_proj"], modules_to_save=saved), "b")
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
        _attach(model, "first", 1, target_modules="all-linear", modules_to_save=["lm_head"])
    snapshot = capture_state(model)
    with pytest.raises((dt.TargetNotFoundError, dt.ConfigError, ValueError)):
        dt.attach(model, dt.LoraConfig(r=4, **kwargs), "second")
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("name", ["a.b", "", "with space", "1abc"])
def test_bad_adapter_names_are_rejected(tiny_llama, name):
    with pytest.raises(ValueError, match="adapter name"):
        dt.attach(tiny_llama, _lora(), name)
    assert not _targets(tiny_llama)


def test_duplicate_adapter_name_is_rejected(tiny_llama):
    _attach(tiny_llama, "a", 1)
    snapshot = capture_state(tiny_llama)
    with pytest.raises(ValueError, match="already attached"):
        dt.attach(tiny_llama, _lora(target_modules="all-linear"), "a")
    assert_unchanged(tiny_llama, snapshot)


def test_attach_rejects_a_non_config(tiny_llama):
    with pytest.raises(TypeError, match="AdapterConfig"):
        dt.attach(tiny_llama, {"r": 4})  # type: ignore[arg-type]
