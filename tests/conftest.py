"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) that builds in milliseconds; one thread."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt

torch.set_num_threads(1)


def make_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    config._name_or_path = "tiny-llama"
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids():
    return torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))


def capture_state(model):
    """Everything a failed operation must leave as it was: modules, tensors, trainability, adapters."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        dict(dt.adapter_configs(model)),
        dt.active_adapters(model),
    )


def assert_unchanged(model, saved) -> None:
    modules, state, grads, configs, active = saved
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert dt.adapter_configs(model) == configs
    assert dt.active_adapters(model) == active
