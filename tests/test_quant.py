"""NF4 + double quantization, Linear4bit and whole-model quantization: parity with a reference computed from
the code book here, with bitsandbytes (when installed) and with an nn.Linear built from the dequantized weight."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from deltatune.quant import (
    DYNAMIC_MAP, NF4_CODE, Linear4bit, QuantizationError, QuantizedWeightError, check_full_precision,
    dequantize_model, dequantize_nf4, footprint, quantizable_linears, quantize_model, quantize_nf4,
)
from deltatune.quant.nf4 import block_absmax, nf4_bytes, unpack_nibbles

from conftest import make_tiny_llama

SHAPES = [(576, 576), (192, 576), (100, 70), (7, 3), (33,)]  # 576-wide: SmolLM2; then ragged and odd counts


def bnb_functional():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference implementation")
    return bnb.functional


def weight(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


# ---- the code book and the reference quantizer --------------------------------------------------------
def test_nf4_code_book_is_the_normal_quantiles():
    """QLoRA §3 / bnb create_normal_map: 8 positive and 7 negative N(0,1) quantiles, an exact 0, max-normalized."""
    offset = 0.9677083
    ndtri = lambda p: torch.special.ndtri(torch.tensor(p, dtype=torch.float64))  # noqa: E731
    pos = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].tolist())
    neg = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].tolist())
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    values = values / values.max()
    torch.testing.assert_close(NF4_CODE.double(), values, atol=2e-7, rtol=0)  # bnb normalizes in float32
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8 and NF4_CODE[7] == 0


def reference_nf4(w: torch.Tensor, blocksize: int = 64):
    """Nearest code by brute force, element by element: codes (n,) and absmax (n_blocks,)."""
    flat = w.reshape(-1).double()
    absmax = torch.stack([blk.abs().max() for blk in flat.split(blocksize)])
    scaled = flat / absmax.repeat_interleave(blocksize)[: flat.numel()]
    codes = (scaled.unsqueeze(1) - NF4_CODE.double()).abs().argmin(1)
    return codes, absmax


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_matches_reference_from_code_book(shape):
    w = weight(shape)
    state = quantize_nf4(w, double_quant=False)
    codes, absmax = reference_nf4(w)
    n = w.numel()
    assert state.packed.numel() == (n + 1) // 2 and state.absmax.numel() == -(-n // 64)
    torch.testing.assert_close(state.absmax.double(), absmax, atol=0, rtol=0)
    assert torch.equal(unpack_nibbles(state.packed, n).long(), codes)
    # even element in the high nibble
    assert torch.equal(state.packed[0] >> 4, codes[0].to(torch.uint8))
    expected = (NF4_CODE[codes].double() * absmax.repeat_interleave(64)[:n]).float().view(shape)
    assert torch.equal(dequantize_nf4(state), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_decodes_absmax_closely(shape):
    w = weight(shape, seed=1)
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert dq.absmax.dtype == torch.uint8 and dq.absmax2.numel() == -(-dq.absmax.numel() // 256)
    torch.testing.assert_close(dq.offset, plain.absmax.mean())
    # the 8-bit dynamic code has ≤ ~1% relative error near the top of its range
    err = (block_absmax(dq) - plain.absmax).abs().max()
    assert err <= 0.01 * (plain.absmax - plain.absmax.mean()).abs().max() + 1e-8
    assert torch.equal(unpack_nibbles(dq.packed, w.numel()), unpack_nibbles(plain.packed, w.numel()))


def test_bits_per_weight_on_576_wide_matrices():
    for shape in [(576, 576), (1536, 576), (192, 576)]:
        state = quantize_nf4(weight(shape))
        assert state.bits_per_weight <= 4.13
        assert state.nbytes == nf4_bytes(state.numel)
        assert quantize_nf4(weight(shape), double_quant=False).bits_per_weight == 4.5


def test_zero_block_and_bf16_input():
    w = weight((4, 64))
    w[1] = 0
    state = quantize_nf4(w.bfloat16(), double_quant=False)
    assert state.absmax[1] == 0 and dequantize_nf4(state).dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(state)[1], torch.zeros(64, dtype=torch.bfloat16))


def test_rejects_non_float_and_empty():
    with pytest.raises(TypeError, match="float tensor"):
        quantize_nf4(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0))


# ---- bitsandbytes parity ------------------------------------------------------------------------------
def test_dynamic_map_is_bnb_create_dynamic_map():
    F = bnb_functional()
    assert torch.equal(DYNAMIC_MAP, F.create_dynamic_map())


@pytest.mark.parametrize("shape,dtype", [((576, 576), torch.float32), ((192, 576), torch.bfloat16),
                                         ((100, 70), torch.float16), ((7, 3), torch.float32), ((33,), torch.float32)])
def test_same_codes_and_values_as_bnb_without_double_quant(shape, dtype):
    F = bnb_functional()
    w = weight(shape, seed=2, dtype=dtype)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(packed.view(-1), ours.packed)
    assert torch.equal(qs.absmax, ours.absmax)
    assert torch.equal(F.dequantize_4bit(packed, qs), dequantize_nf4(ours))


def _lut_ambiguous(x: torch.Tensor) -> torch.Tensor:
    """bnb 0.50's CPU 8-bit quantizer looks normalized values up in a 65536-bin table over [-1, 1]: a value
    within half a bin of a midpoint between codes may take the farther code."""
    midpoints = (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / 2
    return (x.unsqueeze(1) - midpoints).abs().min(1).values <= 1.0 / 65535 + 1e-7


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (192, 576), (100, 70)])
def test_same_codes_and_constants_as_bnb_with_double_quant(shape):
    F = bnb_functional()
    w = weight(shape, seed=3)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert torch.equal(packed.view(-1), ours.packed)
    assert torch.equal(qs.offset, ours.offset) and torch.equal(qs.state2.absmax, ours.absmax2)
    assert qs.blocksize == 64 and qs.state2.blocksize == 256
    # 8-bit codes: identical except where bnb's CPU lookup table cannot resolve the nearest code
    differ = qs.absmax != ours.absmax
    centred = quantize_nf4(w, double_quant=False).absmax - ours.offset
    normalized = centred / ours.absmax2.repeat_interleave(256)[: centred.numel()]
    assert differ.float().mean() < 0.01
    assert _lut_ambiguous(normalized[differ]).all()
    assert ((qs.absmax.int() - ours.absmax.int()).abs() <= 1).all()
    # and where they agree, so do the dequantized weights, bit for bit
    ours_dq, theirs = dequantize_nf4(ours).view(-1), F.dequantize_4bit(packed, qs).view(-1)
    same = ~differ.repeat_interleave(64)[: w.numel()]
    assert torch.equal(ours_dq[same], theirs[same])
    step = (DYNAMIC_MAP[1:] - DYNAMIC_MAP[:-1]).max() * ours.absmax2.max()  # one 8-bit code apart at most
    assert ((ours_dq - theirs).abs() <= step).all()


# ---- Linear4bit ---------------------------------------------------------------------------------------
def reference_linear(layer: Linear4bit) -> nn.Linear:
    ref = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.compute_dtype)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize_weight())
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


def input_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_forward_and_input_grad_equal_dequantized_linear(compute_dtype, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(linear, compute_dtype=compute_dtype, double_quant=double_quant)
    ref = reference_linear(layer)
    x, g = torch.randn(2, 5, 96, dtype=compute_dtype), torch.randn(2, 5, 40, dtype=compute_dtype)
    y, gx = input_grad(layer, x, g)
    y_ref, gx_ref = input_grad(ref, x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear4bit_casts_input_and_returns_its_dtype():
    layer = Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, reference_linear(layer)(x.bfloat16()).float())


def test_linear4bit_trainable_bias_gets_its_gradient():
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    layer.bias.requires_grad_(True)
    layer(torch.randn(4, 64)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((8,), 4.0))


def test_linear4bit_protocol_and_refusals():
    layer = Linear4bit.from_linear(nn.Linear(64, 32, bias=False), compute_dtype=torch.bfloat16)
    assert Linear4bit.quantized is True and not isinstance(layer, nn.Linear)
    assert (layer.in_features, layer.out_features, layer.weight_shape) == (64, 32, torch.Size([32, 64]))
    w = layer.dequantize_weight()
    assert w.shape == (32, 64) and w.dtype == torch.bfloat16 and not w.requires_grad
    assert not hasattr(layer, "weight")
    with pytest.raises(QuantizedWeightError, match="dequantize_weight"):
        layer.weight  # noqa: B018
    with pytest.raises(QuantizedWeightError, match="cannot be undone exactly"):
        layer.set_weight(w)
    assert all(t.dtype != torch.float32 or t.numel() <= 1 for t in layer.state_dict().values())


def test_linear4bit_to_dtype_keeps_constants_in_fp32():
    layer = Linear4bit.from_linear(nn.Linear(64, 300), double_quant=True)
    before = layer.dequantize_weight()
    layer.to(torch.bfloat16)
    assert layer.weight_absmax2.dtype == torch.float32 and layer.weight_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize_weight(), before)


def test_linear4bit_state_dict_round_trip_and_grads_after_eval():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 48), compute_dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    fresh = Linear4bit(128, 48, compute_dtype=torch.float32)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(fresh.dequantize_weight(), layer.dequantize_weight())
    ref = reference_linear(layer)
    x, g = torch.randn(6, 128), torch.randn(6, 48)
    fresh.eval()
    with torch.no_grad():
        fresh(x)  # an inference forward must leave nothing behind that changes the training path
    fresh.train()
    assert torch.equal(input_grad(fresh, x, g)[1], input_grad(ref, x, g)[1])


def test_bnb_cpu_loses_input_grad_after_eval_forward_and_ours_does_not():
    """Documents a bitsandbytes 0.50 CPU bug: an eval-mode no-grad forward repacks the weight for its AVX512-BF16
    kernel (`packing_format_for_cpu`), and every later forward runs that kernel, which has no autograd formula:
    the input gets no gradient (PyTorch only warns), so adapters below the layer silently stop learning."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    theirs = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    theirs = theirs.to("cpu")
    if not getattr(theirs, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes does not take the repacking path here")
    ours = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    x, g = torch.randn(5, 64), torch.randn(5, 32)
    expected = input_grad(ours, x, g)[1]
    before = input_grad(theirs, x, g)[1]
    torch.testing.assert_close(before, expected, atol=1e-5, rtol=1e-4)  # fine before any eval forward
    for module in (theirs, ours):
        module.eval()
        with torch.no_grad():
            module(torch.randn(2, 64))
        module.train()
    x_theirs = x.clone().requires_grad_()
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        theirs(x_theirs).backward(g)
    if x_theirs.grad is not None and torch.allclose(x_theirs.grad, expected, atol=1e-5, rtol=1e-4):
        pytest.skip("this bitsandbytes no longer has the bug")
    assert x_theirs.grad is None  # the bug: no gradient at all
    assert torch.equal(input_grad(ours, x, g)[1], expected)


# ---- whole models -------------------------------------------------------------------------------------
def test_quantize_model_replaces_linears_but_not_head_norms_embeddings(input_ids):
    model = make_tiny_llama()
    with torch.no_grad():
        before = model(input_ids).logits
    names = quantize_model(model, compute_dtype=torch.float32)
    assert names == quantizable_linears(make_tiny_llama()) and len(names) == 14
    assert all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.deltatune_quantization["double_quant"] is True
    with torch.no_grad():
        after = model(input_ids).logits
    assert torch.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.98  # 4-bit error, random weights
    with torch.no_grad():
        assert torch.equal(dequantize_model(model)(input_ids).logits, after)


def test_quantized_model_equals_its_dequantized_copy_with_grads(input_ids):
    model = make_tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    ref = dequantize_model(make_tiny_llama_quantized_copy(model))
    assert not any(isinstance(m, Linear4bit) for m in ref.modules())
    emb_grads = []
    for m in (model, ref):
        m.model.embed_tokens.weight.requires_grad_(True)
        m.eval()
        with torch.no_grad():
            m(input_ids)  # eval forwards first, as in a validation pass
        m.train()
        m(input_ids).logits.square().mean().backward()
        emb_grads.append(m.model.embed_tokens.weight.grad)
    torch.testing.assert_close(emb_grads[0], emb_grads[1], atol=1e-6, rtol=1e-5)


def make_tiny_llama_quantized_copy(model):
    copy = make_tiny_llama()
    quantize_model(copy, compute_dtype=torch.float32)
    copy.load_state_dict(model.state_dict())
    return copy


def test_footprint_counts_the_quantized_layers():
    model = make_tiny_llama()
    planned = footprint(model)
    quantize_model(model, compute_dtype=torch.bfloat16)
    done = footprint(model)
    assert planned.params == done.params == 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128)
    assert (planned.fp32, planned.nf4_dq) == (done.fp32, done.nf4_dq) and done.stored == done.nf4_dq
    assert done.bits_per_weight() < 4.14 and planned.stored == planned.fp32  # tiny layers: <256 blocks each
    assert done.stored <= done.fp32 / 7
    assert planned.other == done.other  # embeddings and norms untouched


def test_model_level_errors():
    model = make_tiny_llama()
    check_full_precision(model)
    with pytest.raises(QuantizationError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)))
    quantize_model(model)
    with pytest.raises(QuantizationError, match="dequantize_model"):
        check_full_precision(model, "save_pretrained")


def test_load_quantized_equals_quantize_model(tmp_path, input_ids):
    from deltatune.quant import load_quantized

    make_tiny_llama().save_pretrained(tmp_path)
    expected = make_tiny_llama()
    quantize_model(expected, compute_dtype=torch.float32)
    model = load_quantized(tmp_path, compute_dtype=torch.float32)
    ours, theirs = model.state_dict(), expected.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected(input_ids).logits)
    with pytest.raises(QuantizationError, match="safetensors"):
        load_quantized(tmp_path / "missing")


def test_lora_on_the_4bit_base_gets_the_gradients_of_the_dequantized_model(input_ids):
    """Adapters see the 4-bit base through the core's protocol: the same grads as on its dequantized copy."""
    import deltatune as dt

    models = []
    for dequantize in (False, True):
        model = make_tiny_llama()
        quantize_model(model, compute_dtype=torch.float32)
        if dequantize:
            dequantize_model(model)
        torch.manual_seed(1)
        dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.train()
        model(input_ids).logits.square().mean().backward()
        models.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    quantized, reference = models
    assert sorted(quantized) == sorted(reference) and len(quantized) == 28
    for name, grad in reference.items():
        assert torch.equal(quantized[name], grad), name
