"""DoRA against its formula (METHODS.md §4), against the real peft package both ways, merged, stacked, quantized.

    h = g ⊙ (W x + s·B·A·x) + b,   g = m / n,   n = ‖W + s·B·A‖ per output row (detached)
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import ALL_LINEAR, make_tiny_llama, no_grad_logits
from deltatune.methods.dora import DoraLinear

peft = pytest.importorskip("peft")


def _kwargs(**kwargs) -> dict:
    """DoRA r=4 with random A and B (init_lora_weights=False): the same keywords for deltatune and peft."""
    return {"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False,
            "target_modules": ["q_proj", "v_proj"], **kwargs}


def _dora(**kwargs) -> dt.LoraConfig:
    return dt.LoraConfig(**_kwargs(**kwargs))


def _scramble_magnitudes(model, seed: int) -> None:
    """m away from n, so the magnitude matters (it equals n at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))


def _formula(site: dt.WeightSite, name: str, x: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
    """g ⊙ (W x + s·B·A·x) + b from the raw tensors; W, b default to the base layer's."""
    delta = site.deltas[name]
    base = site.base_layer
    weight = base.weight if weight is None else weight
    bias = base.bias if bias is None else bias
    A, B, s, m = delta.lora_A.weight, delta.lora_B.weight, delta.scaling, delta.lora_magnitude_vector
    norm = torch.linalg.norm(weight + s * (B @ A), dim=1).detach()
    out = (m / norm) * (x @ weight.T + s * (x @ A.T @ B.T))
    return out if bias is None else out + bias


class _Proj(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 10, bias=bias)

    def forward(self, x):
        return self.proj(x)


# ---- the formula, forward and gradient ------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_forward_and_gradients_match_formula(bias):
    torch.manual_seed(0)
    model = dt.attach(_Proj(bias), _dora(target_modules=["proj"]))
    _scramble_magnitudes(model, 1)
    site, x = model.proj, torch.randn(3, 5, 12, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, _formula(site, "default", x), atol=1e-6, rtol=1e-5)
    # the gradients of the one-node rescale equal autograd's through the formula (n detached)
    grad_out = torch.randn_like(out)
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(out, params, grad_out)
    reference = torch.autograd.grad(_formula(site, "default", x), params, grad_out)
    for name, a, b in zip(["x", "A", "B", "m"], ours, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_magnitude_starts_at_row_norms_and_the_model_is_unchanged(tiny_llama, input_ids):
    expected = no_grad_logits(tiny_llama, input_ids)
    weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dt.attach(tiny_llama, dt.LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    site = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(site.deltas["default"], DoraLinear)
    torch.testing.assert_close(site.deltas["default"].lora_magnitude_vector, torch.linalg.norm(weight, dim=1))
    assert torch.equal(no_grad_logits(tiny_llama, input_ids), expected)  # g = 1 exactly while B = 0


def test_bf16_autocast_keeps_the_magnitude_precise():
    # g = 1.02 is 1.0234 in bf16; the rescale multiplies by (g - 1) instead, which bf16 holds to 0.4%
    torch.manual_seed(0)
    model = dt.attach(_Proj(False), dt.LoraConfig(r=4, use_dora=True, target_modules=["proj"]))
    with torch.no_grad():
        model.proj.deltas["default"].lora_magnitude_vector.mul_(1.02)
    x = torch.randn(256, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    with dt.disable_adapters(model), torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close((out.float() / base.float()).mean(), torch.tensor(1.02), atol=1e-3, rtol=0)


def test_saves_at_most_one_extra_output_sized_tensor():
    """Memory: beside LoRA's own saved tensors, DoRA keeps one (tokens, d_out) tensor (its output), not peft's two."""
    def saved_bytes(use_dora: bool) -> int:
        torch.manual_seed(0)
        model = dt.attach(_Proj(False), dt.LoraConfig(r=4, use_dora=use_dora, target_modules=["proj"]))
        x = torch.randn(64, 12, requires_grad=True)
        total = [0]

        def pack(t):
            if t.dim() and t.shape[0] == 64:  # activations (tokens first), not the (d_out,)/(d_out, r) ones
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total[0]

    assert saved_bytes(True) - saved_bytes(False) == 64 * 10 * 4  # its output, (tokens, d_out) fp32


def test_norm_is_computed_once_for_inference_and_again_after_an_update(tiny_llama, input_ids):
    dt.attach(tiny_llama, _dora())
    delta = tiny_llama.model.layers[0].self_attn.q_proj.deltas["default"]
    calls = []
    original = delta.row_norm
    delta.row_norm = lambda *a: calls.append(1) or original(*a)
    first = no_grad_logits(tiny_llama, input_ids)
    assert torch.equal(no_grad_logits(tiny_llama, input_ids), first) and len(calls) == 1
    with torch.no_grad():
        delta.lora_B.weight.add_(0.1)  # an optimizer step writes in place: the cached n must not be reused
    changed = no_grad_logits(tiny_llama, input_ids)
    assert len(calls) == 2 and not torch.allclose(changed, first)
    fresh = make_tiny_llama()
    dt.attach(fresh, _dora())
    dt_tensors = dt.adapter_tensors(fresh, "default")
    with torch.no_grad():
        for key, tensor in dt.adapter_tensors(tiny_llama, "default").items():
            dt_tensors[key].copy_(tensor)
    torch.testing.assert_close(no_grad_logits(fresh, input_ids), changed, atol=1e-6, rtol=1e-6)


def test_dropout_in_training_follows_peft():
    """With lora_dropout in training, the correction term uses W·drop(x), as peft does: same logits, same seed."""
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, lora_dropout=0.3, init_lora_weights=False)
    torch.manual_seed(1)
    ours = dt.attach(make_tiny_llama(), dt.LoraConfig(**kwargs)).train()
    _scramble_magnitudes(ours, 2)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**kwargs)).train()
    _copy_into_peft(ours, theirs)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(9)
    a = ours(ids).logits
    torch.manual_seed(9)
    b = theirs(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(input_ids):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = dt.attach(make_tiny_llama(), _dora(target_modules="all-linear")).train()
        _scramble_magnitudes(model, 2)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({k: t.grad for k, t in dt.adapter_tensors(model, "default").items()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-5, msg=key)


# ---- peft, both ways ------------------------------------------------------------------------------

def _copy_into_peft(model, peft_model) -> None:
    ours = {k.removeprefix("base_model.model."): v for k, v in dt.adapter_tensors(model, "default").items()}
    with torch.no_grad():
        for name, param in peft_model.base_model.model.named_parameters():
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            if key in ours:
                param.copy_(ours[key])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids():
    return torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(7))


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    config._name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


PEFT_CASES = {
    "q-v": (make_tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "all-linear-rslora": (make_tiny_llama, {"target_modules": "all-linear", "use_rslora": True, "lora_alpha": 16}),
    "rank-pattern": (make_tiny_llama, {"target_modules": ["q_proj", "k_proj", "down_proj"], "rank_pattern": {"down_proj": 2}}),
    "gpt2-conv1d-bias": (_tiny_gpt2, {"target_modules": ["c_attn", "c_fc"]}),  # the bias is not rescaled
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_deltatune_file_loads_in_peft(tmp_path, case):
    make_model, kwargs = PEFT_CASES[case]
    torch.manual_seed(1)
    model = dt.attach(make_model(), _dora(**kwargs))
    _scramble_magnitudes(model, 2)
    dt.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(make_model(), str(tmp_path)).eval()
    ids = _ids() % model.config.vocab_size
    expected = _logits(model, ids)
    assert (expected - _logits(make_model(), ids)).abs().max() > 1e-2  # the adapter is not a no-op
    assert (_logits(loaded, ids) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_file_loads_in_deltatune(tmp_path, case):
    make_model, kwargs = PEFT_CASES[case]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_model(), peft.LoraConfig(**_kwargs(**kwargs)))
        _scramble_magnitudes(theirs, 2)
        theirs.save_pretrained(str(tmp_path))
    model = dt.load_adapter(make_model(), tmp_path)
    ids = _ids() % model.config.vocab_size
    assert (_logits(model, ids) - _logits(theirs.eval(), ids)).abs().max() <= 1e-4
    config = dt.adapter_configs(model)["default"]
    assert config.use_dora and all(isinstance(model.get_submodule(p).deltas["default"], DoraLinear)
                                   for p in dt.adapters(model)["default"].sites)


def test_file_keys_and_gradients_equal_peft(tmp_path):
    torch.manual_seed(1)
    model = dt.attach(make_tiny_llama(), _dora(target_modules="all-linear"))
    _scramble_magnitudes(model, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                         target_modules="all-linear"))
        _copy_into_peft(model, theirs)
        theirs.save_pretrained(str(tmp_path / "peft"))
    dt.save_adapter(model, tmp_path / "dt")
    from safetensors import safe_open

    def keys(path):
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k).shape for k in f.keys()}

    assert keys(tmp_path / "dt") == keys(tmp_path / "peft")
    assert keys(tmp_path / "dt")["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] == (128,)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    ours = {k.removeprefix("base_model.model."): v.grad for k, v in dt.adapter_tensors(model, "default").items()}
    for name, param in theirs.base_model.model.named_parameters():
        if param.requires_grad:
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            torch.testing.assert_close(ours[key], param.grad, atol=1e-5, rtol=1e-4, msg=key)


# ---- merging and stacking -------------------------------------------------------------------------

def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "base_layer" in k}


def test_merge_equals_forward_and_unmerge_restores(input_ids):
    torch.manual_seed(1)
    model = dt.attach(make_tiny_llama(), _dora(target_modules="all-linear"))
    _scramble_magnitudes(model, 2)
    before, expected = _weights(model), no_grad_logits(model, input_ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
    merged = _weights(model)
    dt.merge(model)
    assert all(torch.equal(v, merged[k]) for k, v in _weights(model).items())
    dt.unmerge(model)
    for key, value in _weights(model).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6, msg=key)
    torch.testing.assert_close(no_grad_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)


def test_merged_weight_is_the_formula():
    torch.manual_seed(0)
    model = dt.attach(_Proj(True), _dora(target_modules=["proj"]))
    _scramble_magnitudes(model, 1)
    delta, base = model.proj.deltas["default"], model.proj.base_layer
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    direction = W + delta.scaling * (delta.lora_B.weight @ delta.lora_A.weight)
    expected = (delta.lora_magnitude_vector / torch.linalg.norm(direction, dim=1))[:, None] * direction
    dt.merge(model)
    torch.testing.assert_close(base.weight.detach(), expected.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(base.bias.detach(), b)  # the bias is not rescaled


def test_dora_stacked_after_lora_equals_the_merged_stack(input_ids):
    """LoRA then DoRA on the same modules, both active: DoRA normalises W0 + ΔW_lora, and merging gives the same."""
    model = make_tiny_llama()
    torch.manual_seed(1)
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                   init_lora_weights=False), "lora")
    torch.manual_seed(2)
    dt.attach(model, _dora(target_modules=["q_proj", "v_proj"]), "dora")
    _scramble_magnitudes(model, 3)
    dt.set_active(model, ["lora", "dora"])
    site = model.model.layers[1].self_attn.v_proj
    x = torch.randn(2, 5, 64)
    lora = site.deltas["lora"]
    stacked_weight = site.base_layer.weight + lora.scaling * lora.lora_B.weight @ lora.lora_A.weight
    with torch.no_grad():
        torch.testing.assert_close(site(x), _formula(site, "dora", x, weight=stacked_weight), atol=1e-5, rtol=1e-5)
    expected, before = no_grad_logits(model, input_ids), _weights(model)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    for key, value in _weights(model).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6, msg=key)
    with pytest.raises(dt.NotMergeableError, match="'dora'.*'lora'"):
        dt.merge(model, ["dora"])  # DoRA alone would move below the LoRA it rescales


def test_mixed_batch_rows_equal_separate_runs(input_ids):
    model = make_tiny_llama()
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        dt.attach(model, _dora(target_modules="all-linear"), name)
    _scramble_magnitudes(model, 5)
    names = ["b", None, "a"]
    with dt.route(model, names):
        mixed = no_grad_logits(model, input_ids)
    for row, name in enumerate(names):
        if name is None:
            with dt.disable_adapters(model):
                alone = no_grad_logits(model, input_ids[row:row + 1])
        else:
            dt.set_active(model, name)
            alone = no_grad_logits(model, input_ids[row:row + 1])
        torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-5)


def test_four_bit_base_uses_the_dequantized_weight(input_ids):
    from deltatune.quant import quantize_model

    model = make_tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    torch.manual_seed(1)
    dt.attach(model, _dora(target_modules=["q_proj", "v_proj"]))
    _scramble_magnitudes(model, 2)
    site = model.model.layers[0].self_attn.q_proj
    weight = site.base_layer.dequantize_weight()
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(site(x), _formula(site, "default", x, weight=weight, bias=site.base_layer.bias),
                                   atol=1e-5, rtol=1e-5)
    expected = no_grad_logits(model, input_ids)
    merged = dt.merge_and_unload(model)  # in place is refused for a 4-bit base; this writes dequantized Linears
    torch.testing.assert_close(no_grad_logits(merged, input_ids), expected, atol=1e-4, rtol=1e-4)


def test_embedding_target_is_refused_with_the_reason():
    with pytest.raises(dt.TargetNotFoundError, match="embed_tokens.*LORA cannot be applied"):
        dt.attach(make_tiny_llama(), _dora(target_modules=["embed_tokens"]))
    model = dt.attach(make_tiny_llama(), _dora(target_modules="all-linear"))
    assert sorted(dt.adapters(model)["default"].sites) == sorted(ALL_LINEAR)
