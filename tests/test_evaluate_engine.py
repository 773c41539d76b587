"""Evaluation through the serving engine: the same greedy outputs as `generate_batch` (fp32: token for token;
bf16 autocast: the same lengths, mostly the same tokens), and `generate_batch` wherever the engine cannot run
the model as it stands."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.serve import Engine
from deltatune.train.evaluate import eval_generation
from serve_helpers import add_lora, byte_tokenizer, tiny_llama

PROMPTS = ["hello", "the cat sat on", "a", "what is 2 + 2?", "name a city", "xyz", "tell me a story about", "ok"]


def records(n: int = len(PROMPTS)) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "yes"}]} for p in PROMPTS[:n]]


def both_paths(model, tok, **kwargs) -> tuple[dict, dict]:
    """(through the engine, through generate_batch): the outputs of the same evaluation."""
    kwargs = {"max_new_tokens": 10, "batch_size": 3, **kwargs}
    served = eval_generation(model, tok, records(), **kwargs)
    plain = eval_generation(model, tok, records(), engine=False, **kwargs)
    assert plain["path"] == "generate_batch"
    return served, plain


def outputs(result: dict) -> list[str]:
    return [s["output"] for s in result["samples"]]


@pytest.fixture
def tok():
    return byte_tokenizer()


def test_base_and_lora_fp32_equal_generate_batch(tok):
    """Batches of 3 with rows ending at different steps: the engine refills rows, generate() pads them."""
    model = tiny_llama()
    served, plain = both_paths(model, tok)
    assert served["path"] == "engine" and outputs(served) == outputs(plain)
    assert len(set(outputs(served))) > 4  # the rows differ: the comparison is not between empty strings
    add_lora(model, "a", 4, seed=1)
    dt.set_active(model, "a")
    with_lora, plain_lora = both_paths(model, tok)
    assert with_lora["path"] == "engine" and outputs(with_lora) == outputs(plain_lora)
    assert outputs(with_lora) != outputs(served)  # the adapter ran
    assert model.training is False  # the caller's mode is restored


def test_dora_and_prompt_tuning_fp32_equal_generate_batch(tok):
    torch.manual_seed(3)
    model = tiny_llama()
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False), "dora")
    dora, plain = both_paths(model, tok)
    assert dora["path"] == "engine" and outputs(dora) == outputs(plain)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4), "prompt")  # now the one active adapter
    with torch.no_grad():
        dt.adapters(model)["prompt"].part(model).prompt_embeddings.normal_(0, 1.0)
    prompt = eval_generation(model, tok, records(), max_new_tokens=10, batch_size=3)
    # generate() with prompt tuning numbers left padding among the positions (as peft does), so a padded batch
    # is not each row alone; one prompt at a time it is, and so is every row of the engine
    alone = eval_generation(model, tok, records(), max_new_tokens=10, batch_size=1, engine=False)
    padded = eval_generation(model, tok, records(), max_new_tokens=10, batch_size=3, engine=False)
    assert prompt["path"] == "engine" and outputs(prompt) == outputs(alone) and outputs(prompt) != outputs(dora)
    assert outputs(padded) != outputs(alone)


def test_bf16_autocast_runs_with_the_same_lengths(tok):
    """Under bf16 autocast the engine and generate() sum in different orders, so tokens may part: compared are
    the lengths (end-of-sequence off: every row runs the full 10 tokens on both paths, counted in tokens) and
    the share of rows equal token for token (at least half)."""
    model = tiny_llama()
    add_lora(model, "a", 4, seed=1)
    dt.set_active(model, "a")
    served, plain = both_paths(model, tok, bf16=True)
    assert served["path"] == "engine" and served["n"] == plain["n"] == len(PROMPTS)
    assert sum(a == b for a, b in zip(outputs(served), outputs(plain))) >= len(PROMPTS) // 2

    model.generation_config.eos_token_id = model.config.eos_token_id = None
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    engine = [o.token_ids for o in Engine(model, autocast=torch.bfloat16).generate(prompts, ["a"] * len(prompts),
                                                                                     max_new_tokens=10)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(input_ids=ids, attention_mask=(torch.arange(width) >= width - torch.tensor(
            [len(p) for p in prompts])[:, None]).long(), max_new_tokens=10, do_sample=False, pad_token_id=0)
    hf = out[:, width:].tolist()
    assert [len(t) for t in engine] == [len(t) for t in hf] == [10] * len(PROMPTS)
    assert sum(a == b for a, b in zip(engine, hf)) >= len(PROMPTS) // 2


def test_engine_under_autocast_caches_what_attention_produces(tok):
    """bf16 projections times fp32 rotary tables: keys in fp32, values in bf16, as transformers' cache keeps them."""
    model = tiny_llama()
    engine = Engine(model, tok, autocast=torch.bfloat16)
    engine.generate(["hi", "hello there"], max_new_tokens=3)
    assert engine.cache.k[0].dtype == torch.float32 and engine.cache.v[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="autocast must be"):
        Engine(model, tok, autocast=torch.float32)


def test_what_the_engine_cannot_run_goes_through_generate_batch(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      bos_token_id=256, eos_token_id=258)).eval()
    assert eval_generation(gpt2, tok, records(2), max_new_tokens=3)["path"] == "generate_batch"

    config = tiny_llama().config
    config.attention_bias = True
    model = LlamaForCausalLM(config).eval()
    dt.attach(model, dt.BitFitConfig(), "bitfit")  # the biases trained in place: they cannot differ per row
    assert eval_generation(model, tok, records(2), max_new_tokens=3)["path"] == "generate_batch"

    model = tiny_llama()
    add_lora(model, "a", 2, seed=1)
    add_lora(model, "b", 2, seed=2)
    dt.set_active(model, ["a", "b"])  # stacked: one row would need both
    assert eval_generation(model, tok, records(2), max_new_tokens=3)["path"] == "generate_batch"
    dt.set_active(model, "a")
    with dt.disable_adapters(model):
        assert eval_generation(model, tok, records(2), max_new_tokens=3)["path"] == "generate_batch"
    dt.merge(model)
    assert eval_generation(model, tok, records(2), max_new_tokens=3)["path"] == "generate_batch"
    dt.unmerge(model)
    assert eval_generation(model, tok, records(2), max_new_tokens=3)["path"] == "engine"

    long = [{"prompt": "x" * 120, "completion": "y"}]  # 120 prompt + 10 new tokens > the 128 positions
    assert eval_generation(model, tok, long, max_new_tokens=10)["path"] == "generate_batch"


def test_bf16_inference_storage_gives_the_same_logits_and_answers(tok):
    """`store_for_bf16_inference` (what `deltatune eval`/`generate` do under bf16): base linears and a bf16 copy
    of the tied head, adapters left in fp32; logits and answers on both paths as before, bit for bit."""
    from deltatune.train.memory import store_for_bf16_inference

    model = add_lora(tiny_llama(), "a", 4, seed=1)
    dt.set_active(model, "a")
    model.eval()
    ids = torch.randint(0, 256, (3, 9))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids).logits
    served, plain = both_paths(model, tok, bf16=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied before
    assert store_for_bf16_inference(model) == 2 * 7 + 1  # 14 linear layers and the head
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # the fused kernels read these in fp32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids).logits, ref)
    served_after, plain_after = both_paths(model, tok, bf16=True)
    assert outputs(served_after) == outputs(served) and outputs(plain_after) == outputs(plain)
