"""QLoRA end to end: adapters of every low-rank method on the 4-bit base, the training loop, the adapter file, the
CLI (train / inspect / eval / generate / merge / info with --quantize), 8-bit and paged optimizers.

Parity where a reference exists: a 4-bit model and an unquantized model built from its dequantized weights
give the same logits and gradients (after eval-mode forwards and a save/load too); a merged QLoRA adapter
gives the logits of the unmerged 4-bit model; peft reads the adapter onto an unquantized base.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.config import ConfigError
from deltatune.quant import (
    Linear4bit, QuantizationError, dequantize_model, is_quantized_model, quantize_model, quantized_layers,
)

from conftest import make_seq_cls, make_tiny_llama
from test_cli import TINY_LORA, chats, model_dir, run as run_cli  # noqa: F401 (fixtures)
from test_train_loop import make_tokenizer, prompt_completion, run as run_train

METHODS = {
    "lora": dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "dora": dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True),
    "ia3": dt.IA3Config(init_ia3_weights=False),
}


def quantized_tiny(compute_dtype=torch.float32):
    model = make_tiny_llama()
    quantize_model(model, compute_dtype=compute_dtype)
    return model


def saved(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def reloaded(state: bytes) -> nn.Module:
    """A fresh 4-bit model from a saved state dict (the NF4 buffers through torch.save/torch.load)."""
    fresh = quantized_tiny()
    fresh.load_state_dict(torch.load(io.BytesIO(state)))
    return fresh


def trainable_grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_on_the_4bit_base_equal_the_dequantized_model_after_eval_and_save_load(tmp_path, method, input_ids):
    """LoRA, DoRA (its norms read the dequantized weight through the site) and IA3 need no 4-bit special case."""
    quantized = quantized_tiny()
    base = saved(quantized)
    torch.manual_seed(1)
    dt.attach(quantized, METHODS[method])
    quantized.eval()
    with torch.no_grad():  # eval-mode forwards first, as a validation pass does
        quantized(input_ids)
    dt.save_adapter(quantized, tmp_path / "adapter")
    model = dt.load_adapter(reloaded(base), tmp_path / "adapter", trainable=True)
    model.eval()
    with torch.no_grad():
        model(input_ids)
    reference = dt.load_adapter(dequantize_model(reloaded(base)), tmp_path / "adapter", trainable=True)
    assert is_quantized_model(model) and not is_quantized_model(reference)
    logits, grads = trainable_grads(model, input_ids)
    ref_logits, ref_grads = trainable_grads(reference, input_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(ref_grads) and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_chunked_bf16_dequantization_is_bnb_bit_for_bit():
    """The 1536x576 weight spans several dequantization chunks; bf16 straight out equals bnb's bf16 result."""
    F = pytest.importorskip("bitsandbytes.functional")
    from deltatune.quant import dequantize_nf4, quantize_nf4

    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    ours = quantize_nf4(w, double_quant=False)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    state.dtype = torch.bfloat16
    assert torch.equal(F.dequantize_4bit(packed, state), dequantize_nf4(ours, torch.bfloat16))
    assert torch.equal(dequantize_nf4(ours, torch.bfloat16), dequantize_nf4(ours, torch.float32).bfloat16())


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_under_autocast_the_4bit_layer_returns_and_differentiates_as_nn_linear(compute_dtype):
    """bf16 out under bf16 autocast, as nn.Linear (an fp32 output would make every later activation fp32)."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 48), compute_dtype=compute_dtype)
    ref = nn.Linear(64, 48, dtype=compute_dtype)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize_weight())
        ref.bias.copy_(layer.bias)
    ref.requires_grad_(False)
    outs = []
    for module in (layer, ref):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        y.float().square().sum().backward()
        outs.append((y, x.grad))
    (y, gx), (y_ref, gx_ref) = outs
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_train_on_a_4bit_base_leaves_it_alone_and_writes_a_peft_file_that_loads_anywhere(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    tokenizer = make_tokenizer()
    result = run_train(tmp_path, "qlora", prompt_completion(8), tokenizer, quantize="nf4", precision="bf16",
                       frozen_bf16=True, max_steps=3, batch_size=4, optim={"lr": 1e-2})
    assert "quantized base: 14 linear layers" in capsys.readouterr().out
    _, metadata = dt.read_adapter(result.adapter_dir)[1:]
    assert metadata["deltatune_base_quantization"] == "nf4-dq"

    quantized = quantized_tiny(torch.bfloat16)
    dt.load_adapter(quantized, result.adapter_dir)
    assert all(layer.weight_nf4.dtype == torch.uint8 for _, layer in quantized_layers(quantized))
    plain = dt.load_adapter(make_tiny_llama(), result.adapter_dir)  # the same file onto the unquantized base
    ids = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, base = plain(ids).logits, make_tiny_llama()(ids).logits
        theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(result.adapter_dir)).eval()(ids).logits
        on_4bit = quantized(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter is not a no-op
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert torch.cosine_similarity(on_4bit.flatten(), ours.flatten(), dim=0) > 0.98  # 4-bit error only


def test_gradient_checkpointing_on_a_4bit_base_trains_the_same(tmp_path):
    """QLoRA's memory recipe: the 4-bit layers are recomputed in the backward, with the same result."""
    tokenizer = make_tokenizer()
    common = dict(quantize="nf4", precision="bf16", max_steps=2, batch_size=4, optim={"lr": 1e-2})
    plain = run_train(tmp_path, "plain", prompt_completion(8), tokenizer, **common)
    memory = run_train(tmp_path, "memory", prompt_completion(8), tokenizer, gradient_checkpointing=True, **common)
    assert memory.losses == plain.losses
    ours, theirs = dt.read_adapter(memory.adapter_dir)[1], dt.read_adapter(plain.adapter_dir)[1]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_train_quantizes_the_model_it_is_given_and_frozen_bf16_leaves_it_alone(tmp_path):
    tokenizer = make_tokenizer()
    model = make_tiny_llama()
    dt.train(model=model, tokenizer=tokenizer, quantize="nf4", precision="bf16", max_steps=1, batch_size=2,
             output_dir=str(tmp_path / "run"), data={"train": str(_jsonl(tmp_path))},
             adapter={"peft_type": "LORA", "r": 2, "target_modules": "all-linear"})
    expected = quantized_tiny(torch.bfloat16).state_dict()
    for name, layer in quantized_layers(model):  # frozen_bf16 cast no NF4 buffer; training changed no code
        assert layer.weight_nf4.dtype == torch.uint8 and layer.compute_dtype == torch.bfloat16
        assert torch.equal(layer.weight_nf4, expected[f"{name.replace('.base_layer', '')}.weight_nf4"])
    assert len(list(quantized_layers(model))) == 14
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32


def _jsonl(tmp_path):
    import json

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_completion(4)))
    return path


def test_full_fine_tuning_paged_optimizers_and_8bit_states_on_a_4bit_base(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(QuantizationError, match="trains base weight matrices in place"):
        run_train(tmp_path, "full", prompt_completion(4), tokenizer, quantize="nf4", max_steps=1, batch_size=2,
                  adapter={"peft_type": "FULL"})
    with pytest.raises(ConfigError, match="optim.name paged_adamw_8bit: paged optimizers need CUDA"):
        run_train(tmp_path, "paged", prompt_completion(4), tokenizer, quantize="nf4", max_steps=1, batch_size=2,
                  optim={"name": "paged_adamw_8bit"})
    # 8-bit AdamW states: trains, checkpoints, resumes (bitsandbytes' state dict), and refuses a changed base
    common = dict(quantize="nf4", batch_size=2, save_every=1, optim={"name": "adamw_8bit", "lr": 1e-2})
    first = run_train(tmp_path, "8bit", prompt_completion(4), tokenizer, max_steps=2, **common)
    assert first.steps == 2
    resumed = run_train(tmp_path, "8bit", prompt_completion(4), tokenizer, max_steps=3, resume=True, **common)
    assert resumed.steps == 3 and resumed.last_loss is not None
    with pytest.raises(ConfigError, match="quantize"):
        run_train(tmp_path, "8bit", prompt_completion(4), tokenizer, max_steps=4, resume=True,
                  **{**common, "quantize": None})


def test_sequence_classification_heads_stay_in_full_precision():
    model = make_seq_cls()
    names = quantize_model(model)
    assert type(model.score) is nn.Linear and "score" not in names and len(names) == 14


# ---- the command line ------------------------------------------------------------------------------------
def test_cli_qlora_train_inspect_eval_generate_merge(tmp_path, model_dir, chats, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from deltatune.models import load_model

    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--model", str(model_dir), "--data.train", str(chats), "--max_steps", "3",
                                 "--batch_size", "2", "--output_dir", str(out), "--optim.lr", "1e-2",
                                 "--quantize", "nf4", *TINY_LORA], capsys)
    assert code == 0, err
    assert "quantized base: 14 linear layers" in stdout and "trained 3 steps" in stdout
    adapter = out / "adapter"

    code, stdout, err = run_cli(["inspect", str(adapter)], capsys)
    assert code == 0 and "trained on   a nf4-dq base (QLoRA)" in stdout

    code, stdout, err = run_cli(["eval", "--base", str(model_dir), "--adapter", str(adapter), "--data", str(chats),
                                 "--max-new-tokens", "3", "--precision", "fp32"], capsys)
    assert code == 0, err
    assert "trained on an NF4 base" in err and "perplexity" in stdout  # --quantize auto followed the file
    code, _, err = run_cli(["generate", "--base", str(model_dir), "--adapter", str(adapter), "--prompt", "the cat",
                            "--max-new-tokens", "3", "--quantize", "nf4", "--threads", "1"], capsys)
    assert code == 0, err

    merged_dir = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--base", str(model_dir), "--adapter", str(adapter), "--out",
                                 str(merged_dir)], capsys)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    unmerged, _ = load_model(str(model_dir), quantize="nf4", compute_dtype=torch.float32)
    dt.load_adapter(unmerged, adapter)
    base, _ = load_model(str(model_dir), quantize="nf4", compute_dtype=torch.float32)
    ids = torch.randint(6, 22, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, before = unmerged(ids).logits, base(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (expected - before).abs().max() > 1e-2  # the merge carried a real delta

    code, _, err = run_cli(["merge", "--base", str(model_dir), "--adapter", str(adapter), "--out",
                            str(tmp_path / "merged16"), "--quantize", "none", "--dtype", "bf16"], capsys)
    assert code == 0, err  # the QLoRA adapter merged into the 16-bit base instead, written in bf16
    assert all(p.dtype == torch.bfloat16 for p in AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged16", dtype="auto").parameters())

    code, stdout, _ = run_cli(["info", str(model_dir)], capsys)
    assert code == 0 and "NF4 + DQ" in stdout and "bf16" in stdout


def test_load_model_quantize_errors(model_dir):  # noqa: F811
    from deltatune.models import load_model

    with pytest.raises(ValueError, match="quantize='int4' is not supported; choose one of nf4"):
        load_model(str(model_dir), quantize="int4")
    model, _ = load_model(str(model_dir), quantize="nf4")
    assert model.deltatune_quantization["name"] == "nf4-dq" and model.generation_config.eos_token_id is not None


@pytest.mark.e2e
def test_embedded_model_loads_in_nf4_streamed_with_its_footprint():
    """The real SmolLM2: 210 layers in NF4 + DQ (52.2 MiB), the tied head fp32, the same loss on text."""
    from deltatune.models import load_model
    from deltatune.quant import footprint

    model, tokenizer = load_model(quantize="nf4", compute_dtype=torch.float32)
    plan = footprint(model)
    assert plan.layers == 210 and plan.stored == plan.nf4_dq and round(plan.nf4_dq / 2**20, 1) == 52.2
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert model.generation_config.eos_token_id is not None
    full, _ = load_model()
    ids = tokenizer("Paris is the capital of France. Berlin is the capital of Germany.", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, reference = model(ids, labels=ids).loss, full(ids, labels=ids).loss
    assert abs(ours - reference) < 0.5 * reference  # 4-bit error on a short text, not a broken model
