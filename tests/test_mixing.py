"""Methods living together: LoRA, DoRA and IA3 on the same modules, a batch mixing LoRA, DoRA, IA3, prompt
tuning and the base, and merges of any mix that succeed for every layer or change none."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, assert_unchanged, capture_state, make_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]  # shared by every method below (IA3 scales down_proj's input)


def _configs():
    return {
        "lora": dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        "dora": dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False),
        "ia3": dt.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
        "prompt": dt.PromptTuningConfig(num_virtual_tokens=3),
    }


def _perturb(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def _model(names=("lora", "dora", "ia3", "prompt")):
    model = make_tiny_llama()
    configs = _configs()
    for seed, name in enumerate(names, 1):
        torch.manual_seed(seed)
        dt.attach(model, configs[name], name)
        _perturb(model, name, seed)
    return model


def _ids():
    return torch.randint(1, 256, (5, 9), generator=torch.Generator().manual_seed(7))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -ids.shape[1]:]  # prompt tuning adds virtual positions in front


def test_lora_ia3_dora_on_the_same_modules_each_saves_and_reloads_alone(tmp_path):
    model = _model(("lora", "dora", "ia3"))
    site = model.model.layers[0].self_attn.k_proj
    assert list(site.deltas) == ["lora", "dora", "ia3"]
    ids = _ids()
    for name in ("lora", "dora", "ia3"):
        dt.save_adapter(model, tmp_path / name, name)
        alone = dt.load_adapter(make_tiny_llama(), tmp_path / name)
        dt.set_active(model, name)
        torch.testing.assert_close(_logits(alone, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_a_batch_mixing_every_method_and_the_base_equals_each_row_alone():
    model = _model()
    assert_mixed_equals_alone(model, _ids(), ["prompt", "lora", None, "ia3", "dora"])


def test_stacked_lora_dora_ia3_merge_to_their_forward():
    model = _model(("lora", "dora", "ia3"))
    dt.set_active(model, ["lora", "dora", "ia3"])
    ids = _ids()
    stacked = _logits(model, ids)
    dt.merge(model)
    torch.testing.assert_close(_logits(model, ids), stacked, atol=1e-4, rtol=1e-4)
    dt.unmerge(model)
    torch.testing.assert_close(_logits(model, ids), stacked, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("active", [["lora", "ia3", "bottleneck"], ["dora", "bottleneck"], ["bottleneck", "lora"]])
def test_a_mix_with_a_non_mergeable_adapter_merges_nothing(active):
    model = _model(("lora", "dora", "ia3"))
    dt.attach(model, dt.BottleneckConfig(), "bottleneck")
    dt.set_active(model, active)
    saved = capture_state(model)
    with pytest.raises(dt.NotMergeableError, match="nothing was changed"):
        dt.merge(model)
    assert_unchanged(model, saved)
