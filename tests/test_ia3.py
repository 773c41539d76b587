"""(IA)³ against its formula (METHODS.md §11), the real peft package both ways, merging, and the stacking order.

    output target       h = l ⊙ (W x + b),   l: (d_out, 1)
    feedforward target  h = W (l ⊙ x) + b,   l: (1, d_in)
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import deltatune as dt
from conftest import make_tiny_llama, no_grad_logits
from deltatune.methods.ia3 import IA3Linear

peft = pytest.importorskip("peft")


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    config._name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


def _randomise(model, name: str = "default", seed: int = 0) -> None:
    """l away from ones, so every vector changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            tensor.mul_(1 + 0.3 * torch.randn(tensor.shape, generator=generator))


def _ids(vocab: int = 256):
    return torch.randint(1, vocab, (3, 9), generator=torch.Generator().manual_seed(7))


def _site(model, layer: int, path: str):
    return model.get_submodule(f"model.layers.{layer}.{path}")


# ---- config -----------------------------------------------------------------------------------------

def test_config_writes_exactly_peft_keys(tmp_path):
    kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    dt.save_adapter(dt.attach(make_tiny_llama(), dt.IA3Config(**kwargs)), tmp_path / "dt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # deltatune writes task_type CAUSAL_LM for a causal LM unasked, as peft does when told it
        peft.get_peft_model(make_tiny_llama(), peft.IA3Config(task_type="CAUSAL_LM", **kwargs)).save_pretrained(str(tmp_path / "peft"))
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("dt", "peft"))
    assert set(ours) == set(theirs) == set(peft.IA3Config().to_dict())
    for key in ("target_modules", "feedforward_modules"):
        ours[key], theirs[key] = sorted(ours[key]), sorted(theirs[key])
    assert {k: (v, theirs[k]) for k, v in ours.items() if v != theirs[k]} == {}
    assert dt.IA3Config.from_dict(ours).feedforward_modules == ("down_proj",)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers_to_transform": [0]}, "IA3Config has no layers_to_transform.*target_modules regex"),
    ({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, r"must name targets; \['down_proj'\] match no entry"),
    ({"feedforward_modules": "down_proj("}, "feedforward_modules.*not a valid regular expression"),
    ({"init_ia3_weights": "yes"}, "init_ia3_weights must be true or false"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.IA3Config(**kwargs)


def test_defaults_follow_peft_for_llama_and_unknown_models_must_say(tiny_llama):
    dt.attach(tiny_llama, dt.IA3Config())
    sites = dt.adapters(tiny_llama)["default"].sites
    assert len(sites) == 6 and sorted({p.split(".", 3)[-1] for p in sites}) == [
        "mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"]
    k, v, down = (_site(tiny_llama, 0, p).deltas["default"] for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert (k.ia3_l.shape, v.ia3_l.shape, down.ia3_l.shape) == ((32, 1), (32, 1), (1, 128))
    assert not k.is_feedforward and down.is_feedforward and all(torch.equal(d.ia3_l, torch.ones_like(d.ia3_l)) for d in (k, v, down))

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(dt.ConfigError, match="feedforward_modules is not set.*feedforward_modules=\\[\\]"):
        dt.attach(Bare(), dt.IA3Config(target_modules=["proj"]))
    dt.attach(Bare(), dt.IA3Config(target_modules=["proj"], feedforward_modules=[]))


# ---- the formula ------------------------------------------------------------------------------------

def test_forward_matches_formula_on_a_layer_with_bias():
    model = _tiny_gpt2()
    dt.attach(model, dt.IA3Config(init_ia3_weights=False))  # gpt2: c_attn (output) and mlp.c_proj (feedforward)
    attn, proj = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
    x_attn, x_proj = torch.randn(2, 3, 32), torch.randn(2, 3, 128)
    with torch.no_grad():
        l = attn.deltas["default"].ia3_l  # (96, 1)
        torch.testing.assert_close(attn(x_attn), l.flatten() * (x_attn @ attn.base_layer.weight + attn.base_layer.bias))
        l = proj.deltas["default"].ia3_l  # (1, 128)
        torch.testing.assert_close(proj(x_proj), (l.flatten() * x_proj) @ proj.base_layer.weight + proj.base_layer.bias)


# ---- peft, both ways --------------------------------------------------------------------------------

PEFT_CASES = {
    "llama-defaults": (make_tiny_llama, {}),
    "llama-regex": (make_tiny_llama, {"target_modules": r".*\.(q_proj|up_proj|down_proj)",
                                      "feedforward_modules": r".*\.(up_proj|down_proj)"}),
    "llama-all-linear": (make_tiny_llama, {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "o_proj"]}),
    "gpt2-conv1d-bias": (_tiny_gpt2, {}),
}


def _vocab(make_model) -> int:
    return make_model().config.vocab_size


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_deltatune_file_loads_in_peft(tmp_path, case):
    make_model, kwargs = PEFT_CASES[case]
    model = dt.attach(make_model(), dt.IA3Config(**kwargs))
    _randomise(model)
    dt.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(make_model(), str(tmp_path)).eval()
    ids = _ids(_vocab(make_model))
    expected = no_grad_logits(model, ids)
    assert (expected - no_grad_logits(make_model(), ids)).abs().max() > 1e-2
    assert (no_grad_logits(loaded, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_file_loads_in_deltatune(tmp_path, case):
    make_model, kwargs = PEFT_CASES[case]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), peft.IA3Config(init_ia3_weights=False, **kwargs))
        theirs.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert f.keys() and all(k.endswith(".ia3_l") for k in f.keys())
    model = dt.load_adapter(make_model(), tmp_path)
    ids = _ids(_vocab(make_model))
    assert (no_grad_logits(model, ids) - no_grad_logits(theirs.eval(), ids)).abs().max() <= 1e-5
    shapes = {k: tuple(t.shape) for k, t in dt.adapter_tensors(model, "default").items()}
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert shapes == {k: tuple(f.get_tensor(k).shape) for k in f.keys()}


# ---- merging --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_model", [make_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2-bias"])
def test_merge_equals_forward_and_unmerge_restores(make_model):
    model = dt.attach(make_model(), dt.IA3Config())
    _randomise(model)
    ids = _ids(_vocab(make_model))
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    expected = no_grad_logits(model, ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    if make_model is _tiny_gpt2:  # the output vector scales the bias too; the feedforward one does not
        attn, proj = model.transformer.h[0].attn.c_attn, model.transformer.h[0].mlp.c_proj
        torch.testing.assert_close(attn.base_layer.bias, before["transformer.h.0.attn.c_attn.base_layer.bias"]
                                   * attn.deltas["default"].ia3_l.flatten().detach())
        assert torch.equal(proj.base_layer.bias, before["transformer.h.0.mlp.c_proj.base_layer.bias"])
    dt.unmerge(model)
    for key, value in model.state_dict().items():
        if key in before:
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6, msg=key)


# ---- stacking order: IA3 attached after LoRA scales the LoRA-adapted output; before, it does not -----

def _lora(seed: int) -> dt.LoraConfig:
    torch.manual_seed(seed)
    return dt.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"], init_lora_weights=False)


def _stack(order: str):
    model = make_tiny_llama()
    for name in order.split("-"):
        if name == "lora":
            dt.attach(model, _lora(1), "lora")
        else:
            dt.attach(model, dt.IA3Config(target_modules=["v_proj", "down_proj"]), "ia3")
            _randomise(model, "ia3", seed=2)
    dt.set_active(model, ["lora", "ia3"])
    return model


@pytest.mark.parametrize("order", ["lora-ia3", "ia3-lora"])
def test_stacking_order_and_the_merged_stack(order):
    model = _stack(order)
    ids = _ids()
    with torch.no_grad():
        for path, feedforward in (("self_attn.v_proj", False), ("mlp.down_proj", True)):
            site = _site(model, 0, path)
            lora, l = site.deltas["lora"], site.deltas["ia3"].ia3_l.flatten()
            x = torch.randn(2, 3, site.base_layer.in_features)
            W = site.base_layer.weight
            delta = lambda v: lora.scaling * v @ lora.lora_A.weight.T @ lora.lora_B.weight.T  # noqa: E731
            if not feedforward:
                expected = l * (x @ W.T + delta(x)) if order == "lora-ia3" else l * (x @ W.T) + delta(x)
            else:
                expected = (l * x) @ W.T + (delta(l * x) if order == "lora-ia3" else delta(x))
            torch.testing.assert_close(site(x), expected, atol=1e-5, rtol=1e-5)
    expected = no_grad_logits(model, ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    torch.testing.assert_close(no_grad_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    if order == "lora-ia3":
        with pytest.raises(dt.NotMergeableError, match="'ia3'.*'lora'"):
            dt.merge(model, ["ia3"])


def test_the_two_orders_differ():
    ids = _ids()
    assert not torch.allclose(no_grad_logits(_stack("lora-ia3"), ids), no_grad_logits(_stack("ia3-lora"), ids), atol=1e-4)


def test_ia3_adapters_save_alone_from_a_stack(tmp_path):
    model = _stack("lora-ia3")
    dt.save_adapter(model, tmp_path, name="ia3")
    alone = make_tiny_llama()
    dt.attach(alone, dt.IA3Config(target_modules=["v_proj", "down_proj"]))
    for key, tensor in dt.adapter_tensors(model, "ia3").items():
        with torch.no_grad():
            dt.adapter_tensors(alone, "default")[key].copy_(tensor)
    reloaded = dt.load_adapter(make_tiny_llama(), tmp_path)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj.deltas["default"], IA3Linear)
    torch.testing.assert_close(no_grad_logits(reloaded, _ids()), no_grad_logits(alone, _ids()))


def test_four_bit_base_merges_into_a_dequantized_copy():
    from deltatune.quant import quantize_model

    model = make_tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    dt.attach(model, dt.IA3Config())
    _randomise(model)
    expected = no_grad_logits(model, _ids())
    with pytest.raises(dt.NotMergeableError, match="quantized"):
        dt.merge(model)
    torch.testing.assert_close(no_grad_logits(dt.merge_and_unload(model), _ids()), expected, atol=1e-5, rtol=1e-5)
