"""LoRA against its formula (METHODS.md §1): h = W0·x + b + s·B·A·drop(x), s = α/r (α/√r with rsLoRA)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from transformers.pytorch_utils import Conv1D
from deltatune.methods.lora import LoraEmbedding, LoraLinear


def _has(module, delta_cls, name: str = "default") -> bool:
    """Whether `module` is a site holding a delta of `delta_cls` for adapter `name`."""
    return isinstance(module, dt.Site) and name in module.deltas and isinstance(module.deltas[name], delta_cls)


def _q_proj(model, layer: int = 0):
    return model.model.layers[layer].self_attn.q_proj


def _lora_formula(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """W0·x + b + s·B·A·x computed from the raw tensors (no dropout)."""
    A, B = layer.deltas[name].lora_A.weight, layer.deltas[name].lora_B.weight  # (r, d_in), (d_out, r)
    base = layer.base_layer
    W0 = base.weight.T if isinstance(base, Conv1D) else base.weight  # (d_out, d_in)
    out = x @ W0.T + (base.bias if base.bias is not None else 0)
    return out + layer.deltas[name].scaling * (x @ A.T @ B.T)


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


# ---- forward formula and scaling ------------------------------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_forward_matches_formula(tiny_llama, use_rslora):
    r, alpha = 4, 8
    dt.attach(tiny_llama, dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"], use_rslora=use_rslora,
                                        init_lora_weights=False))
    layer = _q_proj(tiny_llama)
    expected_s = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.deltas["default"].scaling == pytest.approx(expected_s)
    assert layer.deltas["default"].lora_A.out_features == r
    assert layer.deltas["default"].lora_A.weight.shape == (r, 64)
    assert layer.deltas["default"].lora_B.weight.shape == (64, r)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _lora_formula(layer, "default", x), atol=1e-5, rtol=1e-5)


def test_default_init_is_kaiming_uniform_and_identity(tiny_llama, input_ids):
    with torch.no_grad():
        before = tiny_llama(input_ids).logits
    dt.attach(tiny_llama, dt.LoraConfig(r=8, target_modules="all-linear"))
    for module in tiny_llama.modules():
        if _has(module, LoraLinear):
            A, B = module.deltas["default"].lora_A.weight, module.deltas["default"].lora_B.weight
            bound = 1 / math.sqrt(module.base_layer.in_features)
            assert A.abs().max() <= bound + 1e-7
            assert A.abs().max() > 0.5 * bound  # really drawn from U(±bound), not tiny
            assert torch.count_nonzero(B) == 0
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(input_ids).logits, before, atol=0, rtol=0)


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    r = 16
    dt.attach(model, dt.LoraConfig(r=r, target_modules=["0"], init_lora_weights="gaussian"))
    A = model[0].deltas["default"].lora_A.weight
    assert A.shape == (r, 512)
    assert A.std().item() == pytest.approx(1 / r, rel=0.05)
    assert A.mean().abs().item() < 0.01
    assert torch.count_nonzero(model[0].deltas["default"].lora_B.weight) == 0


# ---- rank_pattern / alpha_pattern -----------------------------------------------------------------

def test_rank_and_alpha_pattern_apply_to_the_right_modules(tiny_llama):
    config = dt.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear",
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6, "k_proj|o_proj": 3},
        alpha_pattern={"v_proj": 32},
    )
    dt.attach(tiny_llama, config)
    expected_r = {"q_proj": 2, "k_proj": 3, "o_proj": 3}
    for name, module in tiny_llama.named_modules():
        if not _has(module, LoraLinear):
            continue
        leaf = name.split(".")[-1]
        r = 6 if name == "model.layers.1.mlp.down_proj" else expected_r.get(leaf, 4)
        alpha = 32 if leaf == "v_proj" else 8
        assert module.deltas["default"].lora_A.out_features == r, name
        assert module.deltas["default"].lora_A.weight.shape[0] == r, name
        assert module.deltas["default"].lora_B.weight.shape[1] == r, name
        assert module.deltas["default"].scaling == pytest.approx(alpha / r), name
    assert tiny_llama.model.layers[0].mlp.down_proj.deltas["default"].lora_A.out_features == 4  # the full-name key is not a suffix of layer 0


def test_rank_pattern_with_rslora_scales_by_sqrt_of_the_pattern_rank(tiny_llama):
    dt.attach(tiny_llama, dt.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"v_proj": 16}))
    v_proj = tiny_llama.model.layers[0].self_attn.v_proj
    assert v_proj.deltas["default"].scaling == pytest.approx(8 / math.sqrt(16))
    assert _q_proj(tiny_llama).deltas["default"].scaling == pytest.approx(8 / 2)


# ---- dropout only on the LoRA branch ----------------------------------------------------------------

def test_dropout_applies_to_the_lora_branch_only(tiny_llama):
    dt.attach(tiny_llama, dt.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"],
                                        init_lora_weights=False))
    layer = _q_proj(tiny_llama)
    layer.train()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.manual_seed(123)
        out = layer(x)
        torch.manual_seed(123)
        dropped = F.dropout(x, 0.5, training=True)  # the same mask the layer drew
        A, B = layer.deltas["default"].lora_A.weight, layer.deltas["default"].lora_B.weight
        expected = layer.base_layer(x) + layer.deltas["default"].scaling * (dropped @ A.T @ B.T)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, _lora_formula(layer, "default", x), atol=1e-3)  # dropout did something
        layer.eval()
        torch.testing.assert_close(layer(x), _lora_formula(layer, "default", x), atol=1e-5, rtol=1e-5)


# ---- nn.Embedding -------------------------------------------------------------------------------

def test_embedding_lora_init_forward_and_merge():
    torch.manual_seed(0)
    model = _Embedder()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        before = model(ids)
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["embed"]))
    layer = model.embed
    assert _has(layer, LoraEmbedding)
    A, B = layer.deltas["default"].lora_embedding_A, layer.deltas["default"].lora_embedding_B
    assert A.shape == (4, 50) and B.shape == (16, 4)
    assert torch.count_nonzero(A) == 0  # the reverse of Linear: A = 0, B ~ N(0, 1)
    assert B.std().item() == pytest.approx(1.0, rel=0.35)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
        A.normal_()
        s = layer.deltas["default"].scaling
        expected = layer.base_layer.weight[ids] + s * (A.T[ids] @ B.T)  # E[x] + s·(B·A)ᵀ[x]
        torch.testing.assert_close(layer(ids), expected, atol=1e-5, rtol=1e-5)
        unmerged = model(ids)
        weight = layer.base_layer.weight.clone()
        dt.merge(model)
        torch.testing.assert_close(layer.base_layer.weight, weight + s * (B @ A).T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)


# ---- GPT-2 Conv1D (fan_in_fan_out) --------------------------------------------------------------------

def test_gpt2_conv1d_target_transposes_the_delta():
    model = _tiny_gpt2()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    layer = model.transformer.h[0].attn.c_attn
    assert _has(layer, LoraLinear) and isinstance(layer.base_layer, Conv1D)
    assert layer.base_layer.weight.shape == (32, 96)  # Conv1D stores W as (d_in, d_out)
    assert layer.deltas["default"].lora_A.weight.shape == (4, 32)
    assert layer.deltas["default"].lora_B.weight.shape == (96, 4)
    assert layer.deltas["default"].delta_weight().shape == (96, 32)  # (d_out, d_in): the site transposes for Conv1D
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _lora_formula(layer, "default", x), atol=1e-5, rtol=1e-5)
        unmerged = model(ids).logits
        dt.merge(model)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_fan_in_fan_out_flag_on_a_plain_linear_is_ignored(tiny_llama, input_ids):
    # peft ignores fan_in_fan_out=True on nn.Linear; transposing the square q_proj delta would merge a wrong weight.
    dt.attach(tiny_llama, dt.LoraConfig(r=4, target_modules=["q_proj"], fan_in_fan_out=True, init_lora_weights=False))
    assert not isinstance(_q_proj(tiny_llama).base_layer, Conv1D)
    with torch.no_grad():
        unmerged = tiny_llama(input_ids).logits
        dt.merge(tiny_llama)
        torch.testing.assert_close(tiny_llama(input_ids).logits, unmerged, atol=1e-5, rtol=1e-5)


# ---- any nn.Module, not only transformers ----------------------------------------------------------

def test_plain_sequential_of_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = model(x)
    dt.attach(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert _has(model[0], LoraLinear) and _has(model[2], LoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(5, 4)
    for _ in range(3):
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        expected = _lora_formula(model[2], "default", torch.relu(_lora_formula(model[0], "default", x)))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), before)
        unmerged = model(x)
        plain = dt.merge_and_unload(model)
        assert type(plain[0]) is nn.Linear and type(plain[2]) is nn.Linear
        torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-5)


# ---- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -1}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "x"}, "bias"),
        ({"init_lora_weights": "foo"}, "init_lora_weights"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"target_modules": "q_proj[("}, "target_modules"),
        ({"exclude_modules": "(unclosed"}, "exclude_modules"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
    ids=lambda v: None if isinstance(v, dict) else v,
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(dt.ConfigError, match=rf"\b{field}\b"):
        dt.LoraConfig(**kwargs)


def test_from_dict_unknown_keys_are_named():
    with pytest.raises(dt.ConfigError) as info:
        dt.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "foo": 1, "lora_rank": 2})
    assert "foo" in str(info.value) and "lora_rank" in str(info.value)


def test_from_dict_rejects_unsupported_peft_features_and_other_methods():
    with pytest.raises(dt.ConfigError, match="use_qalora"):
        dt.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "use_qalora": True})
    with pytest.raises(dt.ConfigError, match="IA3"):
        dt.LoraConfig.from_dict({"peft_type": "IA3"})
    # peft-only keys at their "off" values are accepted
    config = dt.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "use_dora": False, "megatron_core": "megatron.core"})
    assert config.r == 4


def test_config_is_frozen_and_round_trips_through_dict():
    config = dt.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    with pytest.raises(Exception):
        config.r = 8  # type: ignore[misc]
    assert dt.LoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lora_dropout": "0.1"}, "lora_dropout must be a number, got '0.1'"),
    ({"r": "8"}, "r must be an integer"),
    ({"target_modules": 5}, "target_modules must be a string or a list of strings or null"),
    ({"lora_alpha": "sixteen"}, "lora_alpha must be a number"),
])
def test_python_type_errors_are_config_errors_naming_the_field(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(**kwargs)
