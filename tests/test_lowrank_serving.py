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
