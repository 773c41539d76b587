"""Shared fixtures: a tiny random Llama (2 layers, hidden 64) that builds in milliseconds; one thread."""
from __future__ import annotations

import pytest
import torch
from torch import nn

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


def random_lora(**kwargs) -> dt.LoraConfig:
    """LoRA r=4 on q_proj and v_proj with random A and B, so that every adapter changes the output."""
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    kwargs.setdefault("init_lora_weights", False)
    return dt.LoraConfig(r=4, lora_alpha=8, **kwargs)


def attach_random(model, name: str, seed: int, **kwargs):
    config = random_lora(**kwargs)
    torch.manual_seed(seed)
    return dt.attach(model, config, name)


def no_grad_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


ALL_LINEAR = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def adapted_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, dt.AdapterLayer)]


def make_seq_cls(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def logits_alone(model, ids, name):
    """Logits with only adapter `name` active (None: adapters disabled); the active set is restored."""
    previous = dt.active_adapters(model)
    if name is None:
        with dt.disable_adapters(model):
            out = no_grad_logits(model, ids)
    else:
        dt.set_active(model, name)
        out = no_grad_logits(model, ids)
    dt.set_active(model, previous)
    return out


def assert_mixed_equals_alone(model, ids, names, atol: float = 1e-5) -> None:
    """A batch routed by `names` equals each row run alone with only its adapter active (None: the base).

    Compares the last ids.shape[1] positions of the logits: prompt tuning prepends virtual positions.
    """
    def logits(x):
        return no_grad_logits(model, x)[:, -x.shape[1]:]

    with dt.route(model, names):
        mixed = logits(ids)
    previous = dt.active_adapters(model)
    for row, name in enumerate(names):
        if name is None:
            with dt.disable_adapters(model):
                alone = logits(ids[row:row + 1])
        else:
            dt.set_active(model, name)
            alone = logits(ids[row:row + 1])
        torch.testing.assert_close(mixed[row], alone[0], atol=atol, rtol=atol, msg=f"row {row} ({name})")
    dt.set_active(model, previous)
