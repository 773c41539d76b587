"""The core's seams, each exercised by a user: a quantized-weight stand-in, block sites, stacks, in-place
selections, injected parts, all-or-nothing merges, per-token routing, and what an adapter file may carry."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import assert_unchanged, attach_random, capture_state, make_tiny_llama, no_grad_logits
from deltatune.core import registry
from deltatune.core.sites import QuantizedMergeError


# ---- test-only methods, registered for one test at a time --------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScaleConfig(dt.AdapterConfig):
    peft_type: ClassVar[str] = "TEST_SCALE"


class OutputScale(dt.Delta):
    """y ⊙ l, like IA3 on a non-feedforward module; merge W ← diag(l)·W, b ← l ⊙ b."""

    @classmethod
    def supports(cls, module):
        return isinstance(module, nn.Linear) or getattr(module, "quantized", False)

    def __init__(self, target, config):
        super().__init__(target, config)
        self.scale = nn.Parameter(torch.ones(target.weight.shape[0]))

    def forward(self, x, y, stage):
        return y * self.scale.to(y.dtype)

    def merge(self, weight, bias):
        return weight * self.scale[:, None], None if bias is None else bias * self.scale

    def unmerge(self, weight, bias):
        return weight / self.scale[:, None], None if bias is None else bias / self.scale


@dataclasses.dataclass(frozen=True)
class BlockConfig(dt.AdapterConfig):
    peft_type: ClassVar[str] = "TEST_BLOCK"


class BlockShift(dt.Delta):
    """A serial bottleneck-like block delta: y + up(down(y)), not mergeable."""

    site = "block"
    mergeable = False

    @classmethod
    def supports(cls, module):
        return True

    def __init__(self, target, config):
        super().__init__(target, config)
        self.down = nn.Linear(64, 4)
        self.up = nn.Linear(4, 64)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, y, stage):
        return y + self.up(torch.relu(self.down(y)))


@pytest.fixture
def test_methods():
    registry.register(ScaleConfig, OutputScale)
    registry.register(BlockConfig, BlockShift)
    yield
    for key in ("TEST_SCALE", "TEST_BLOCK"):
        registry._METHODS.pop(key)


def _perturb(model, name, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


# ---- a quantized base through the BaseWeight protocol ------------------------------------------------

class FakeQuantLinear(nn.Module):
    """A stand-in for a 4-bit layer: int8 codes and a per-row scale, no `weight` attribute at all."""

    quantized = True

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_shape = torch.Size((linear.out_features, linear.in_features))
        self.compute_dtype = torch.float32

    def dequantize_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantize_weight(), self.bias)


def _quantized_tiny_llama():
    model = make_tiny_llama()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FakeQuantLinear(module))
    return model


def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_weights(input_ids):
    quantized = _quantized_tiny_llama()
    plain = make_tiny_llama()  # the same layers, holding the dequantized weights
    for name, module in quantized.named_modules():
        if isinstance(module, FakeQuantLinear):
            plain.get_submodule(name).weight.data.copy_(module.dequantize_weight())
    for model in (quantized, plain):
        attach_random(model, "a", 1, target_modules="all-linear")
    torch.testing.assert_close(no_grad_logits(quantized, input_ids), no_grad_logits(plain, input_ids), atol=1e-5, rtol=1e-5)
    quantized.train()
    loss = quantized(input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None for p in quantized.parameters() if p.requires_grad)


def test_in_place_merge_into_a_quantized_base_is_refused_and_unload_dequantizes(input_ids):
    model = _quantized_tiny_llama()
    attach_random(model, "a", 1, target_modules=["q_proj", "v_proj"])
    adapted = no_grad_logits(model, input_ids)
    saved = capture_state(model)
    with pytest.raises(QuantizedMergeError, match="merge_and_unload"):
        dt.merge(model)
    assert_unchanged(model, saved)
    merged = dt.merge_and_unload(model)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear  # a dequantized Linear holding W + ΔW
    assert isinstance(merged.model.layers[0].self_attn.k_proj, FakeQuantLinear)  # untouched layers stay 4-bit
    torch.testing.assert_close(no_grad_logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)


# ---- stacks: attach order, merging a stack ------------------------------------------------------------

@pytest.mark.parametrize("scale_first", [False, True])
def test_stack_applies_in_attach_order_and_merges_to_its_forward(test_methods, input_ids, scale_first):
    model = make_tiny_llama()
    configs = [("lora", lambda: dt.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)),
               ("scale", lambda: ScaleConfig(target_modules=["v_proj"]))]
    for name, make in (configs[::-1] if scale_first else configs):
        torch.manual_seed(3)
        dt.attach(model, make(), name)
    _perturb(model, "scale", 0.5, seed=1)
    dt.set_active(model, ["lora", "scale"])
    site = model.model.layers[0].self_attn.v_proj
    delta = site.deltas["lora"]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        base = site.base_layer(x)
        lora = delta.lora_output(x)
        scale = site.deltas["scale"].scale
        expected = base * scale + lora if scale_first else (base + lora) * scale
        torch.testing.assert_close(site(x), expected, atol=1e-5, rtol=1e-5)
    stacked = no_grad_logits(model, input_ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), stacked, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), stacked, atol=1e-5, rtol=1e-5)


def test_merging_one_delta_below_a_non_commuting_one_is_refused(test_methods):
    model = make_tiny_llama()
    dt.attach(model, ScaleConfig(target_modules=["v_proj"]), "scale")
    attach_random(model, "lora", 2, target_modules=["v_proj"])
    dt.set_active(model, ["scale", "lora"])
    saved = capture_state(model)
    with pytest.raises(dt.NotMergeableError, match="commute"):
        dt.merge(model, ["lora"])  # folded into W it would come before the scale, which was attached first
    assert_unchanged(model, saved)


def test_two_lora_adapters_commute_so_either_merges_alone(input_ids):
    model = make_tiny_llama()
    attach_random(model, "a", 1)
    attach_random(model, "b", 2)
    dt.set_active(model, ["a", "b"])
    both = no_grad_logits(model, input_ids)
    dt.merge(model, ["b"])
    torch.testing.assert_close(no_grad_logits(model, input_ids), both, atol=1e-5, rtol=1e-5)


# ---- block sites: keyword arguments, tuple outputs, nested weight sites ---------------------------------

def test_block_site_wraps_attention_with_kwargs_and_tuple_output(test_methods, input_ids, tmp_path):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    dt.attach(model, BlockConfig(target_modules=["self_attn"]), "block")
    assert isinstance(model.model.layers[0].self_attn, dt.BlockSite)
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=1e-6, rtol=1e-6)  # zero up: identity
    _perturb(model, "block", 0.2)
    adapted = no_grad_logits(model, input_ids)
    assert not torch.allclose(adapted, base, atol=1e-4)
    # LoRA inside the wrapped block: its target is found by its logical name, and so are its file keys
    attach_random(model, "lora", 1)
    assert isinstance(model.model.layers[0].self_attn.base_layer.q_proj, dt.WeightSite)
    keys = dt.adapter_tensors(model, "lora")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".base_layer." not in k for k in keys)
    dt.set_active(model, ["block", "lora"])
    both = no_grad_logits(model, input_ids)
    dt.save_adapter(model, tmp_path / "lora", "lora")
    other = dt.load_adapter(make_tiny_llama(), tmp_path / "lora")  # LoRA alone, on a model with no block adapter
    dt.set_active(model, "lora")
    torch.testing.assert_close(no_grad_logits(other, input_ids), no_grad_logits(model, input_ids), atol=1e-6, rtol=1e-6)
    dt.set_active(model, ["block", "lora"])
    torch.testing.assert_close(no_grad_logits(model, input_ids), both)
    with dt.route(model, ["block", "lora", None]):
        mixed = no_grad_logits(model, input_ids)
    dt.set_active(model, "block")
    torch.testing.assert_close(mixed[0], no_grad_logits(model, input_ids[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], atol=1e-5, rtol=1e-5)
    dt.delete_adapter(model, "block")
    dt.delete_adapter(model, "lora")
    assert not any(isinstance(m, (dt.Site,)) for m in model.modules())
    torch.testing.assert_close(no_grad_logits(model, input_ids), base)


def test_merge_with_a_non_mergeable_adapter_changes_nothing(test_methods):
    model = make_tiny_llama()
    attach_random(model, "lora", 1, target_modules="all-linear")
    dt.attach(model, BlockConfig(target_modules=["mlp"]), "block")
    dt.set_active(model, ["lora", "block"])
    saved = capture_state(model)
    with pytest.raises(dt.NotMergeableError, match="nothing was changed"):
        dt.merge(model)
    with pytest.raises(dt.NotMergeableError, match="nothing was changed"):
        dt.merge_and_unload(model)
    assert_unchanged(model, saved)


# ---- the active set while merged ---------------------------------------------------------------------

def test_set_active_while_merged_unmerges_first(input_ids):
    model = make_tiny_llama()
    attach_random(model, "a", 1)
    attach_random(model, "b", 2)
    dt.set_active(model, "b")
    b_alone = no_grad_logits(model, input_ids)
    dt.set_active(model, "a")
    dt.merge(model)
    dt.set_active(model, "b")
    torch.testing.assert_close(no_grad_logits(model, input_ids), b_alone, atol=1e-5, rtol=1e-5)
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())


# ---- per-token routing (continuous batching) equals per-row routing ---------------------------------------

def test_per_token_plan_equals_rows():
    model = make_tiny_llama()
    attach_random(model, "a", 1, target_modules="all-linear")
    attach_random(model, "b", 2, target_modules="all-linear")
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 4, 64)
    with torch.no_grad(), dt.route(model, ["a", None, "b"]):
        rows = layer(x)
    tokens = [n for n in ["a", None, "b"] for _ in range(4)]
    with torch.no_grad(), dt.route(model, tokens, per_token=True):
        flat = layer(x.reshape(1, 12, 64))
    torch.testing.assert_close(flat.reshape(3, 4, -1), rows)


# ---- what an adapter file may carry ------------------------------------------------------------------

def test_file_with_an_undeclared_base_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny_llama()
    attach_random(model, "a", 1)
    dt.save_adapter(model, tmp_path, "a")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.zeros(64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    target = make_tiny_llama()
    saved = capture_state(target)
    with pytest.raises(dt.AdapterFileError, match="model.norm.weight"):
        dt.load_adapter(target, tmp_path)
    assert_unchanged(target, saved)


def test_file_with_nan_is_refused_unless_allowed(tmp_path):
    model = make_tiny_llama()
    attach_random(model, "a", 1)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.deltas["a"].lora_B.weight[0, 0] = float("nan")
    dt.save_adapter(model, tmp_path, "a")
    target = make_tiny_llama()
    saved = capture_state(target)
    with pytest.raises(dt.AdapterFileError, match="NaN"):
        dt.load_adapter(target, tmp_path)
    assert_unchanged(target, saved)
    dt.load_adapter(target, tmp_path, allow_nonfinite=True)
    with pytest.raises(ValueError, match="NaN"):
        dt.merge(target)  # safe by default


# ---- an attach that fails leaves nothing behind -------------------------------------------------------------

def test_failed_attach_rolls_back_sites_copies_and_selections(test_methods):
    model = make_tiny_llama()
    attach_random(model, "a", 1)
    saved = capture_state(model)
    config = dt.LoraConfig(r=4, target_modules=["q_proj"], bias="all", modules_to_save=["no_such_module"])
    with pytest.raises(dt.TargetNotFoundError):
        dt.attach(model, config, "b")
    assert_unchanged(model, saved)


def test_adapter_files_follow_the_umask(tmp_path):
    import os
    import stat

    model = make_tiny_llama()
    attach_random(model, "a", 1)
    old = os.umask(0o022)
    try:
        dt.save_adapter(model, tmp_path, "a")
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_an_adapter_attached_to_an_eval_model_runs_no_dropout(input_ids):
    model = make_tiny_llama().eval()
    dt.attach(model, dt.LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(no_grad_logits(model, input_ids), no_grad_logits(model, input_ids), atol=0, rtol=0)
