"""Pfeiffer and parallel adapters: the formulas, the places, the widths the core gives a block method, the
exact or near-identity start, errors naming the field, files, mixed batches, and LoRA inside a wrapped block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import assert_mixed_equals_alone, attach_random, make_tiny_llama, no_grad_logits
from deltatune.core.sites import block_widths


def _sites(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, dt.Site)]


def _perturb(model, name, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def test_block_widths_come_from_the_core():
    model = make_tiny_llama()
    layer = model.model.layers[0]
    assert block_widths(model, "mlp", layer.mlp) == (64, 64)
    assert block_widths(model, "self_attn", layer.self_attn) == (64, 64)
    assert block_widths(model, "up_proj", layer.mlp.up_proj) == (64, 128)
    assert block_widths(model, "embed", model.model.embed_tokens) == (None, 64)
    attach_random(model, "lora", 0, target_modules=["gate_proj"])  # a LoRA site inside the block is not the block
    assert block_widths(model, "mlp", model.model.layers[0].mlp) == (64, 64)


def test_pfeiffer_defaults_one_relu_adapter_after_each_mlp(input_ids):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    dt.attach(model, dt.PfeifferConfig())
    assert _sites(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    delta = model.model.layers[0].mlp.deltas["default"]
    assert isinstance(delta.act, nn.ReLU) and delta.adapter_down.out_features == 4  # 64 // 16
    assert 0 < (no_grad_logits(model, input_ids) - base).abs().max() < 1e-2  # near identity
    assert dt.trainable_parameters(model)[0] == 2 * (64 * 4 + 4 + 4 * 64 + 64)  # half of Houlsby's


def test_pfeiffer_on_bert_sits_on_the_ffn_output():
    import transformers

    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)).eval()
    dt.attach(model, dt.PfeifferConfig())
    assert _sites(model) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


def test_parallel_adapter_is_h_plus_s_up_phi_down_x():
    model = make_tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = mlp(x)
    dt.attach(model, dt.ParallelAdapterConfig(scaling=2.5, activation="gelu"))
    _perturb(model, "default")
    delta = model.model.layers[0].mlp.deltas["default"]
    assert (delta.adapter_down.in_features, delta.adapter_down.out_features, delta.adapter_up.out_features) == (64, 32, 64)
    down, up = delta.adapter_down, delta.adapter_up
    expected = h + 2.5 * (F.gelu(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[0].mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_parallel_adapter_reads_the_input_not_the_output_and_widths_may_differ():
    model = make_tiny_llama()
    up_proj = model.model.layers[0].mlp.up_proj  # 64 -> 128: a parallel adapter beside a Linear
    dt.attach(model, dt.ParallelAdapterConfig(target_modules=["0.mlp.up_proj"], reduction_factor=8, init_weights="houlsby"))
    delta = model.model.layers[0].mlp.up_proj.deltas["default"]
    assert (delta.adapter_down.in_features, delta.adapter_down.out_features, delta.adapter_up.out_features) == (64, 8, 128)
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = model.model.layers[0].mlp.up_proj(x)
        expected = up_proj.base_layer(x) if hasattr(up_proj, "base_layer") else None
        base = model.model.layers[0].mlp.up_proj.base_layer(x)
        torch.testing.assert_close(got - base, 4.0 * delta.adapter_up(F.relu(delta.adapter_down(x))))
    assert expected is None


def test_mam_init_is_exactly_the_base_and_kaiming_down(input_ids):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    dt.attach(model, dt.ParallelAdapterConfig(target_modules=["self_attn", "mlp"]))
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)
    delta = model.model.layers[0].self_attn.deltas["default"]
    assert (delta.adapter_up.weight == 0).all() and delta.adapter_down.weight.abs().max() <= 1 / 64 ** 0.5
    assert delta.adapter_down.weight.std() > 0.05  # Kaiming-uniform(a=√5) on fan-in 64: std 1/√(3·64) = 0.072


def test_config_errors_name_the_field():
    for kwargs, field in [({"scaling": float("inf")}, "scaling"), ({"scaling": "4"}, "scaling"),
                          ({"reduction_factor": 0}, "reduction_factor"), ({"init_weights": "zero_up"}, "init_weights"),
                          ({"activation": "elu"}, "activation")]:
        with pytest.raises(dt.ConfigError, match=field):
            dt.ParallelAdapterConfig(**kwargs)
    with pytest.raises(dt.ConfigError, match="reduction_factor"):
        dt.PfeifferConfig(reduction_factor=-1)
    model = make_tiny_llama()
    with pytest.raises(dt.ConfigError, match="token ids"):
        dt.attach(model, dt.ParallelAdapterConfig(target_modules=["embed_tokens"]))
    assert not _sites(model)


def test_files_round_trip_and_mixed_batches_with_lora(tmp_path, input_ids):
    model = make_tiny_llama()
    dt.attach(model, dt.ParallelAdapterConfig(), "par")
    dt.attach(model, dt.PfeifferConfig(), "pf")
    attach_random(model, "lora", 3, target_modules=["gate_proj", "q_proj"])  # inside both wrapped blocks
    _perturb(model, "par", seed=1)
    _perturb(model, "pf", seed=2)
    ids = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(5))
    assert_mixed_equals_alone(model, ids, ["par", "pf", None, "lora"])
    for name in ("par", "pf"):
        dt.set_active(model, name)
        dt.save_adapter(model, tmp_path / name, name)
        loaded = dt.load_adapter(make_tiny_llama(), tmp_path / name)
        assert type(dt.adapter_configs(loaded)["default"]) is type(dt.adapter_configs(model)[name])
        torch.testing.assert_close(no_grad_logits(loaded, input_ids), no_grad_logits(model, input_ids))
    with pytest.raises(dt.NotMergeableError):
        dt.merge(model, ["par"])


def test_parallel_adapter_trains_beside_attention():
    model = make_tiny_llama().train()
    dt.attach(model, dt.ParallelAdapterConfig(target_modules=["self_attn"], scaling=1.0))
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(6))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
