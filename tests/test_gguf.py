"""The lossless 4-bit GGUF base (`deltatune.quant.gguf`): Q4_1 blocks kept as storage, dequantized per layer.

Parity: the dequantized weight against gguf-py's own `dequantize` (bit for bit, fp32 and bf16), the row
permutation of blocks against transformers' permutation of the dequantized weight, LoRA on the Q4_1 base
against LoRA on its dequantized copy (logits, gradients, trained adapters: equal, not close), and on the
embedded model every layer against the fp32 base transformers loads from the same file.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.quant import QuantizationError, dequantize_model, footprint, is_quantized_model
from deltatune.quant.gguf import LLAMA_LINEARS, GGUFError, LinearQ4_1, read_q4_1_blocks, reverse_rotary_permutation

from conftest import make_tiny_llama
from test_cli import model_dir  # noqa: F401 (fixture)

gguf = pytest.importorskip("gguf")


def q4_1_blocks(weight: torch.Tensor) -> torch.Tensor:
    """gguf-py's Q4_1 quantization of an (out, in) weight: uint8 (out, in/32 · 20)."""
    return torch.from_numpy(gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q4_1))


def q4_1_layer(linear: nn.Linear, compute_dtype=torch.float32) -> LinearQ4_1:
    layer = LinearQ4_1(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype)
    layer.load_blocks(q4_1_blocks(linear.weight.detach()))
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach())
    return layer


def q4_1_tiny(compute_dtype=torch.float32) -> nn.Module:
    """The tiny Llama with every linear layer but the head in Q4_1 (as gguf-py quantizes it)."""
    model = make_tiny_llama()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q4_1_layer(module, compute_dtype))
    return model


@pytest.mark.parametrize("shape", [(8, 64), (48, 96)])
def test_dequantized_weight_is_gguf_py_bit_for_bit(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    blocks = q4_1_blocks(weight)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_1))
    for dtype in (torch.float32, torch.bfloat16):
        layer = LinearQ4_1(shape[1], shape[0], compute_dtype=dtype)
        layer.load_blocks(blocks)
        assert torch.equal(layer.dequantize_weight(), reference.to(dtype))
    assert layer.weight_qs.numel() + 2 * layer.weight_d.numel() + 2 * layer.weight_m.numel() == blocks.numel()  # 5 bits


def test_rotary_row_permutation_of_blocks_is_transformers_permutation_of_weights():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, rows = 3, 3 * 8
    weight = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))
    blocks = q4_1_blocks(weight)
    dequantized = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)
    expected = LlamaTensorProcessor()._reverse_permute_weights(dequantized, heads, heads)
    layer = LinearQ4_1(64, rows)
    layer.load_blocks(reverse_rotary_permutation(blocks, heads))
    assert torch.equal(layer.dequantize_weight(), torch.from_numpy(np.ascontiguousarray(expected)))


def test_layer_protocol_refusals_and_state_dict():
    layer = q4_1_layer(nn.Linear(64, 16))
    assert is_quantized_model(nn.Sequential(layer)) and layer.quantized and tuple(layer.weight_shape) == (16, 64)
    with pytest.raises(AttributeError, match="GGUF Q4_1"):
        layer.weight
    with pytest.raises(AttributeError, match="merge"):
        layer.set_weight(torch.zeros(16, 64))
    assert layer.to(torch.bfloat16).weight_d.dtype == torch.float16  # .to(dtype) never casts the blocks
    assert set(layer.state_dict()) == {"weight_qs", "weight_d", "weight_m", "bias"}
    with pytest.raises(GGUFError, match="multiple"):
        LinearQ4_1(48, 8)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_lora_on_the_q4_1_base_equals_lora_on_the_dequantized_base(compute_dtype, input_ids):
    """Forward, backward and three optimizer steps: the same numbers, bit for bit (fp32 compute; bf16 compute
    against the dequantized base stored in bf16, i.e. frozen_bf16)."""
    quantized = q4_1_tiny(compute_dtype)
    plain = dequantize_model(q4_1_tiny(compute_dtype), compute_dtype)
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trained = []
    for model in (quantized, plain):
        torch.manual_seed(3)
        dt.attach(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
                loss = model(input_ids).logits.float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        trained.append((loss.detach(), dt.adapter_tensors(model, "default")))
    assert torch.equal(trained[0][0], trained[1][0])
    for key, value in trained[0][1].items():
        assert torch.equal(value, trained[1][1][key]), key


def test_merge_and_unload_of_a_q4_1_base_gives_the_unmerged_logits(input_ids):
    model = q4_1_tiny()
    torch.manual_seed(0)
    dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        before = model(input_ids).logits
        merged = dt.merge_and_unload(model)
        dequantize_model(merged)
        assert not is_quantized_model(merged)
        torch.testing.assert_close(merged(input_ids).logits, before, atol=1e-5, rtol=0)


def _write_gguf(path, tensor_type):
    writer = gguf.GGUFWriter(str(path), "llama")
    weight = np.random.default_rng(0).standard_normal((16, 64), dtype=np.float32)
    data = gguf.quants.quantize(weight, tensor_type)
    writer.add_tensor("blk.0.attn_v.weight", data, raw_dtype=tensor_type)  # shape from the bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file_reading_and_other_block_types_refused_by_name(tmp_path):
    config = make_tiny_llama().config
    _write_gguf(tmp_path / "q41.gguf", gguf.GGMLQuantizationType.Q4_1)
    blocks = read_q4_1_blocks(tmp_path / "q41.gguf", config)
    assert list(blocks) == ["model.layers.0.self_attn.v_proj"] and blocks["model.layers.0.self_attn.v_proj"].shape == (16, 40)
    _write_gguf(tmp_path / "q80.gguf", gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_v\.weight is stored as Q8_0"):
        read_q4_1_blocks(tmp_path / "q80.gguf", config)


def _llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (what transformers reverses)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_load_model_quantize_gguf_keeps_the_files_blocks_and_refuses_without_one(tmp_path, model_dir):  # noqa: F811
    """A converted directory with its *.gguf beside it: every layer holds that file's blocks, rows in
    transformers' order, and dequantizes to what gguf-py + transformers' reverse permutation give."""
    import shutil

    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from deltatune.commands import quantize_for
    from deltatune.models import load_model
    from deltatune.train.config import TrainConfig

    assert quantize_for("gguf-q4_1") == "gguf" and quantize_for("nf4-dq") == "nf4" and quantize_for("") is None
    assert TrainConfig(quantize="gguf").quantize == "gguf"
    with pytest.raises(QuantizationError, match=r"0 \*\.gguf files"):
        load_model(str(model_dir), quantize="gguf")
    source = shutil.copytree(model_dir, tmp_path / "converted")
    plain = make_tiny_llama()
    heads = {"attn_q": plain.config.num_attention_heads, "attn_k": plain.config.num_key_value_heads}
    writer = gguf.GGUFWriter(str(source / "tiny.Q4_1.gguf"), "llama")
    expected = {}
    inverse = {v: k for k, v in LLAMA_LINEARS.items()}
    for name, module in plain.named_modules():
        if type(module) is nn.Linear and name != "lm_head":
            layer, leaf = name.split(".")[2], ".".join(name.split(".")[3:])
            kind = inverse[leaf]
            rows = module.weight.detach().numpy()
            rows = _llama_cpp_permute(rows, heads[kind]) if kind in heads else rows
            blocks = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(f"blk.{layer}.{kind}.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
            if kind in heads:
                values = LlamaTensorProcessor()._reverse_permute_weights(values, heads[kind], heads[kind])
            expected[name] = torch.from_numpy(np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model, _ = load_model(str(source), quantize="gguf", compute_dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LinearQ4_1)}
    assert sorted(layers) == sorted(expected) and model.deltatune_quantization["name"] == "gguf-q4_1"
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize_weight(), expected[name]), name
    assert torch.equal(model.model.norm.weight, plain.model.norm.weight)  # the rest from the safetensors


@pytest.mark.e2e
def test_embedded_model_on_its_q4_1_blocks_is_the_fp32_base_bit_for_bit():
    from deltatune.models import load_model

    quantized, _ = load_model(quantize="gguf", compute_dtype=torch.float32)
    plain, _ = load_model()
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, LinearQ4_1)}
    assert len(layers) == 210 and quantized.deltatune_quantization["name"] == "gguf-q4_1"
    weights = dict(plain.named_parameters())
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize_weight(), weights[f"{name}.weight"]), name
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345]])
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, plain(ids).logits)
    plan = footprint(quantized)
    assert plan.stored * 8 / plan.params == pytest.approx(5.0)
