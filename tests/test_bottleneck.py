"""Houlsby bottleneck adapters: the formula, the places (Llama, Mistral, Qwen2, BERT, any model by name), the
near-identity start, merge refused before anything changes, mixed batches, and LoRA inside a wrapped block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import assert_mixed_equals_alone, assert_unchanged, attach_random, capture_state, make_tiny_llama, no_grad_logits
from deltatune.methods.bottleneck import BottleneckAdapter

SITES = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]


def _sites(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, dt.Site)]


def _perturb(model, name, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def test_defaults_wrap_attention_and_mlp_outputs_of_llama(input_ids):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    dt.attach(model, dt.BottleneckConfig())
    assert _sites(model) == SITES
    assert all(isinstance(model.get_submodule(p), dt.BlockSite) for p in SITES)
    delta = model.model.layers[0].self_attn.deltas["default"]
    assert (delta.adapter_down.in_features, delta.adapter_down.out_features) == (64, 4)  # d=64, m = 64 // 16
    assert isinstance(delta.act, nn.SiLU)
    adapted = no_grad_logits(model, input_ids)
    assert 0 < (adapted - base).abs().max() < 1e-2  # near identity, not exactly
    trainable, _ = dt.trainable_parameters(model)
    assert trainable == 4 * (64 * 4 + 4 + 4 * 64 + 64)


def test_init_is_truncated_normal_with_zero_biases_and_zero_up_is_exact_identity(input_ids):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    torch.manual_seed(0)
    dt.attach(model, dt.BottleneckConfig(reduction_factor=2))  # m = 32: 2048 weights per matrix
    weights = torch.cat([t.flatten() for k, t in dt.adapter_tensors(model, "default").items() if k.endswith("weight")])
    assert weights.abs().max() <= 2e-2  # truncated at ±2σ, σ = 1e-2
    assert 0.7e-2 < weights.std() < 1.0e-2  # N(0, σ) truncated at 2σ has std 0.88σ
    assert all((t == 0).all() for k, t in dt.adapter_tensors(model, "default").items() if k.endswith("bias"))
    dt.attach(model, dt.BottleneckConfig(init_weights="zero_up"), "zero")
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)


@pytest.mark.parametrize("activation", ["swish", "relu", "gelu", "tanh"])
def test_output_is_h_plus_up_phi_down_h(activation):
    model = make_tiny_llama()
    mlp = model.model.layers[0].mlp
    h_in = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = mlp(h_in)
    dt.attach(model, dt.BottleneckConfig(target_modules=["mlp"], reduction_factor=8, activation=activation))
    _perturb(model, "default", 0.3)
    delta = model.model.layers[0].mlp.deltas["default"]
    assert delta.adapter_down.out_features == 8
    phi = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
    expected = h + F.linear(phi(F.linear(h, delta.adapter_down.weight, delta.adapter_down.bias)),
                            delta.adapter_up.weight, delta.adapter_up.bias)
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[0].mlp(h_in), expected)


def test_config_checks_name_the_field():
    with pytest.raises(dt.ConfigError, match="reduction_factor"):
        dt.BottleneckConfig(reduction_factor=0)
    with pytest.raises(dt.ConfigError, match="activation.*'swish'"):
        dt.BottleneckConfig(activation="sigmoid")
    with pytest.raises(dt.ConfigError, match="init_weights"):
        dt.BottleneckConfig(init_weights="lora")
    config = dt.BottleneckConfig(reduction_factor=4, activation="tanh", init_weights="zero_up")
    assert type(config).from_dict(config.to_dict()) == config


def _tiny(kind: str):
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**common)).eval()
    config_cls, model_cls = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[kind]
    config = getattr(transformers, config_cls)(num_key_value_heads=2, **common)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize(("kind", "expected"), [
    ("mistral", SITES),
    ("qwen2", SITES),
    ("bert", [f"encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")]),
])
def test_per_architecture_defaults(kind, expected, input_ids):
    torch.manual_seed(0)
    model = _tiny(kind)
    base = model(input_ids).last_hidden_state if kind == "bert" else no_grad_logits(model, input_ids)
    dt.attach(model, dt.BottleneckConfig())
    assert _sites(model) == expected
    with torch.no_grad():
        adapted = model(input_ids).last_hidden_state if kind == "bert" else model(input_ids).logits
    assert adapted.shape == base.shape and not torch.allclose(adapted, base)


def test_a_model_without_a_default_place_names_target_modules(input_ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    saved = capture_state(model)
    with pytest.raises(dt.ConfigError, match="target_modules is not set and BOTTLENECK has no default for .*'gpt2'"):
        dt.attach(model, dt.BottleneckConfig())
    assert_unchanged(model, saved)
    # placed by name on any model: GPT-2's attention (a tuple output) and MLP blocks
    base = no_grad_logits(model, input_ids)
    dt.attach(model, dt.BottleneckConfig(target_modules=["attn", "mlp"], init_weights="zero_up"))
    assert _sites(model) == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn", "mlp")]
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)
    assert model.transformer.h[0].mlp.deltas["default"].adapter_down.in_features == 64  # read from c_proj (Conv1D)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)) for _ in range(2)])
        self.act = nn.Tanh()

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.act(x)


def test_any_model_by_module_name_and_errors_for_places_without_one():
    model = _Net()
    x = torch.randn(3, 8)
    base = model(x)
    config = dt.BottleneckConfig(target_modules=r"blocks\.\d+(\.0)?", reduction_factor=4, init_weights="zero_up")
    dt.attach(model, config)  # each block, and the first Linear inside it
    assert _sites(model) == ["blocks.0", "blocks.0.base_layer.0", "blocks.1", "blocks.1.base_layer.0"]
    assert model.blocks[0].deltas["default"].adapter_down.in_features == 8  # the block's last Linear: 32 -> 8
    assert model.blocks[0].base_layer[0].deltas["default"].adapter_down.in_features == 32  # a Linear: out_features
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)
    with pytest.raises(dt.TargetNotFoundError, match="'blocks'.*BOTTLENECK cannot be applied"):
        dt.attach(_Net(), dt.BottleneckConfig(target_modules=["blocks"]))
    with pytest.raises(dt.ConfigError, match="cannot tell the widths of act"):
        dt.attach(_Net(), dt.BottleneckConfig(target_modules=["act"]))


def test_merge_is_refused_before_any_weight_changes_even_with_lora_active(input_ids):
    model = make_tiny_llama()
    attach_random(model, "lora", 1, target_modules="all-linear")
    dt.attach(model, dt.BottleneckConfig(), "bn")
    dt.set_active(model, ["lora", "bn"])
    saved = capture_state(model)
    for merge in (dt.merge, dt.merge_and_unload):
        with pytest.raises(dt.NotMergeableError, match="cannot merge at .*nothing was changed"):
            merge(model)
        assert_unchanged(model, saved)
    with pytest.raises(dt.NotMergeableError, match="self_attn.*cannot be merged"):
        dt.merge(model, ["bn"])
    assert_unchanged(model, saved)
    dt.merge(model, ["lora"])  # LoRA alone still merges: its sites hold no bottleneck delta
    dt.unmerge(model)


def test_mixed_batch_with_lora_and_base_rows_equals_each_row_alone():
    model = make_tiny_llama()
    dt.attach(model, dt.BottleneckConfig(), "bn1")
    dt.attach(model, dt.BottleneckConfig(reduction_factor=4, activation="gelu"), "bn2")
    attach_random(model, "lora", 3, target_modules="all-linear")
    _perturb(model, "bn1", seed=1)
    _perturb(model, "bn2", seed=2)
    ids = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(5))
    assert_mixed_equals_alone(model, ids, ["bn2", "lora", None, "bn1", "bn2"])


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_on_q_proj_inside_the_wrapped_attention(lora_first, input_ids, tmp_path):
    model = make_tiny_llama()

    def add_lora():
        attach_random(model, "lora", 1, target_modules=["q_proj"])

    def add_bn():
        torch.manual_seed(2)
        dt.attach(model, dt.BottleneckConfig(target_modules=["self_attn"]), "bn")
        _perturb(model, "bn", 0.2, seed=3)

    for add in (add_lora, add_bn) if lora_first else (add_bn, add_lora):
        add()
    q_proj = model.model.layers[0].self_attn.base_layer.q_proj
    assert isinstance(model.model.layers[0].self_attn, dt.BlockSite) and isinstance(q_proj, dt.WeightSite)
    dt.set_active(model, ["lora", "bn"])
    both = no_grad_logits(model, input_ids)
    for name in ("lora", "bn"):
        keys = dt.adapter_tensors(model, name)
        assert keys and all(".base_layer." not in k for k in keys)
        dt.save_adapter(model, tmp_path / name, name)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in dt.adapter_tensors(model, "lora")
    assert "base_model.model.model.layers.0.self_attn.adapter_down.weight" in dt.adapter_tensors(model, "bn")
    for name in ("lora", "bn"):  # each alone, on a fresh model, equals that adapter alone here
        dt.set_active(model, name)
        alone = dt.load_adapter(make_tiny_llama(), tmp_path / name)
        torch.testing.assert_close(no_grad_logits(alone, input_ids), no_grad_logits(model, input_ids),
                                   atol=1e-6, rtol=1e-6)
    other = make_tiny_llama()  # both, loaded in the other order: nested sites, so the order does not matter
    for name in ("bn", "lora") if lora_first else ("lora", "bn"):
        dt.load_adapter(other, tmp_path / name, name)
    dt.set_active(other, ["lora", "bn"])
    torch.testing.assert_close(no_grad_logits(other, input_ids), both, atol=1e-6, rtol=1e-6)
    base = no_grad_logits(make_tiny_llama(), input_ids)
    for name in ("bn", "lora"):
        dt.delete_adapter(model, name)
    assert not _sites(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)


def test_file_is_deltatune_only_and_peft_refuses_it(tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    model = make_tiny_llama()
    dt.attach(model, dt.BottleneckConfig(reduction_factor=8, activation="relu"))
    _perturb(model, "default")
    dt.save_adapter(model, tmp_path)
    config, tensors, _ = dt.read_adapter(tmp_path)
    assert config.peft_type == "BOTTLENECK" and (config.reduction_factor, config.activation) == (8, "relu")
    assert set(tensors) == {f"base_model.model.{s}.adapter_{w}.{p}" for s in SITES for w in ("down", "up")
                            for p in ("weight", "bias")}
    assert dt.registered_methods()["BOTTLENECK"].readers == ("deltatune",)
    with pytest.raises(KeyError, match="BOTTLENECK"):  # peft's own error for a peft_type it does not know
        peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))
    loaded = dt.load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(no_grad_logits(loaded, input_ids), no_grad_logits(model, input_ids), atol=0, rtol=0)


def test_trains_every_adapter_tensor_and_layer_norms_through_modules_to_save():
    model = make_tiny_llama().train()
    config = dt.BottleneckConfig(modules_to_save=["input_layernorm", "post_attention_layernorm"])
    dt.attach(model, config)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    tensors = dt.adapter_tensors(model, "default")
    assert sum("layernorm" in k for k in tensors) == 4
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors.values())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(t) for t in tensors.values()}


def test_bf16_model_keeps_its_dtype(input_ids):
    model = make_tiny_llama().to(torch.bfloat16)
    dt.attach(model, dt.BottleneckConfig())
    assert isinstance(model.model.layers[0].mlp.deltas["default"], BottleneckAdapter)
    assert no_grad_logits(model, input_ids).dtype == torch.bfloat16
