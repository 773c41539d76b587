"""The low-rank view served: DyLoRA at a rank chosen when loading, VeRA and AdaLoRA rows take the engine's fused LoRA
kernels beside LoRA rows (LoHa, not a low-rank product, takes the routed path), with every request's tokens
equal to greedy decoding alone."""
from __future__ import annotations

import torch

import deltatune as dt
from deltatune.serve import Engine
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, tiny_llama


def _randomise(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in dt.adapter_tensors(model, name).items():
            if isinstance(tensor, torch.nn.Parameter):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


def test_dylora_and_vera_rows_are_fused_with_lora_rows(tmp_path):
    model, tok = tiny_llama(), byte_tokenizer()
    add_lora(model, "lora", 4, seed=1)
    dt.attach(model, dt.DyLoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj"]), "dy",
              activate=False)
    _randomise(model, "dy", 2)
    dt.save_adapter(model, tmp_path / "dy", "dy")
    dt.delete_adapter(model, "dy")
    dt.load_adapter(model, f"{tmp_path / 'dy'}@rank=3", "dy3", activate=False)
    dt.attach(model, dt.VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]), "vera", activate=False)
    _randomise(model, "vera", 3)
    dt.attach(model, dt.LoHaConfig(r=2, target_modules=["q_proj"]), "loha", activate=False)
    _randomise(model, "loha", 4)
    dt.attach(model, dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["k_proj", "v_proj"]), "ada",
              activate=False)
    _randomise(model, "ada", 6)
    engine = Engine(model, tok)
    assert [engine.fused.eligible(n) for n in ("lora", "dy3", "vera", "ada", "loha")] == [True, True, True, True, False]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 250, (int(n),), generator=g).tolist() for n in (4, 11, 7, 3, 9, 6, 5)]
    names = ["dy3", "lora", "vera", None, "loha", "dy3", "ada"]
    fused = [o.token_ids for o in engine.generate(prompts, names, max_new_tokens=7)]
    expected = [hf_greedy(model.eval(), p, n, 7) for p, n in zip(prompts, names)]
    assert fused == expected
    routed = [o.token_ids for o in Engine(model, tok, fused_lora=False).generate(prompts, names, max_new_tokens=7)]
    assert routed == expected


def test_save_as_lora_keeps_per_layer_ranks_and_scales_and_peft_reads_it(tmp_path):
    import warnings

    import pytest

    from conftest import make_tiny_llama, no_grad_logits

    peft = pytest.importorskip("peft")
    model = make_tiny_llama()
    torch.manual_seed(2)
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "o_proj"],
                                   rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3.0}))
    export = dt.save_as_lora(model, tmp_path)
    assert set(export.errors.values()) == {0.0}
    config = dt.read_adapter(tmp_path)[0]
    assert (config.r, config.lora_alpha) == (4, 8) and list(config.rank_pattern.values()) == [6]
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(no_grad_logits(theirs, ids), no_grad_logits(model, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a low-rank product"):
        dt.attach(model, dt.IA3Config(), "ia3")
        dt.save_as_lora(model, tmp_path / "ia3", "ia3")
