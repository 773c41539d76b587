"""Prefix caching and chunked prefill: reused or chunked K/V give the tokens a full prefill gives; cached K/V never
cross what changes them (the adapter, its version under the same name, blend weights, precision); memory stays
within its bound."""
from __future__ import annotations

import torch

import deltatune as dt
from deltatune.serve import Engine
from deltatune.serve.prefix import PrefixCache
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, tiny_llama

SYSTEM = list(range(30, 61))  # 31 shared tokens, as the demo's system prompt


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [SYSTEM + torch.randint(0, 250, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _model():
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        add_lora(model, name, 4, seed)
    return model


def test_shared_prefix_reused_gives_the_same_tokens():
    model = _model()
    engine = Engine(model, byte_tokenizer(), max_batch_size=4)
    prompts, names = _prompts(8), ["a", None, "b", "a", None, "b", "a", "a"]
    first = engine.generate(prompts[:1], names[:1], max_new_tokens=6)  # fills the cache with SYSTEM's blocks
    outs = engine.generate(prompts, names, max_new_tokens=6)
    assert [o.token_ids for o in first + outs] == [hf_greedy(model, p, n, 6) for p, n in zip(prompts[:1] + prompts,
                                                                                           names[:1] + names)]
    assert engine.prefix_cache.hits >= 7 * 24  # 3 blocks of 8 of the 31 shared tokens, for the later requests


def test_another_adapter_never_reads_cached_kv():
    model = _model()
    engine = Engine(model, byte_tokenizer())
    prompt = _prompts(1, seed=3)[0]
    for name in ("a", "b", None, "a"):  # the same prompt under each: each its own K/V
        assert engine.generate([prompt], [name], max_new_tokens=8)[0].token_ids == hf_greedy(model, prompt, name, 8)
    assert engine.prefix_cache.hits == (len(prompt) - 1) // 8 * 8  # only the second "a" reused


def test_an_adapter_reattached_under_the_same_name_is_a_new_version():
    model = _model()
    engine = Engine(model, byte_tokenizer())
    prompt = _prompts(1, seed=4)[0]
    before = engine.generate([prompt], ["a"], max_new_tokens=8)[0].token_ids
    dt.delete_adapter(model, "a")
    add_lora(model, "a", 4, seed=77)  # same name, other weights
    after = engine.generate([prompt], ["a"], max_new_tokens=8)[0].token_ids
    assert after == hf_greedy(model, prompt, "a", 8) and after != before
    assert engine.prefix_cache.hits == 0


def test_blend_weights_are_part_of_the_key():
    model = _model()
    engine = Engine(model, byte_tokenizer())
    prompt = _prompts(1, seed=5)[0]
    outs = [engine.generate([prompt], [w], max_new_tokens=8)[0].token_ids
            for w in ({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5})]
    twin = _model()  # the same weights (seeded); a second engine on `model` would attach the same blend names
    fresh = [Engine(twin, byte_tokenizer(), prefix_cache_bytes=0).generate([prompt], [w], max_new_tokens=8)[0].token_ids
             for w in ({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1})]
    full_blocks = (len(prompt) - 1) // 8 * 8  # at least one prompt token is always computed
    assert outs == [fresh[0], fresh[1], fresh[0]] and engine.prefix_cache.hits == full_blocks  # only the repeat


def test_precision_is_part_of_the_key():
    model = _model()
    engine = Engine(model, byte_tokenizer())
    request = engine.add_request(_prompts(1)[0], "a")
    fp32 = engine._prefix_owner(request)
    engine.autocast = torch.bfloat16
    assert engine._prefix_owner(request) != fp32


def test_memory_bound_and_eviction():
    model = _model()
    block_bytes = 2 * 2 * (2 * 8 * 16) * 4  # layers x (K, V) x (kv_heads x block x head_dim) x fp32
    engine = Engine(model, byte_tokenizer(), prefix_cache_bytes=5 * block_bytes)
    prompts = _prompts(6, seed=8)
    for p in prompts:
        engine.generate([[t + 1 for t in p]], ["a"], max_new_tokens=2)  # distinct prompts: evictions
        assert engine.prefix_cache.bytes <= 5 * block_bytes
    assert len(engine.prefix_cache.blocks) == 5
    cache = PrefixCache(0)
    cache.store("x", list(range(16)), [torch.zeros(2, 16, 4)], [torch.zeros(2, 16, 4)])
    assert not cache.blocks  # a zero budget stores nothing


def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill():
    """Prompts of up to 50 tokens in chunks of 5, arriving while others decode, with the prefix cache: each
    request's tokens are generate()'s with its adapter alone."""
    model = _model()
    engine = Engine(model, byte_tokenizer(), max_batch_size=4, prefill_chunk=5)
    prompts, names = _prompts(7, seed=12), ["a", None, "b", "a", "b", None, "a"]
    requests = [engine.add_request(prompts[0], names[0], dt.serve.SamplingParams(max_new_tokens=12))]
    engine.step()
    engine.step()  # the first request is still prefilling (35+ tokens in chunks of 5) when the others arrive
    assert requests[0].prefilling and not requests[0].output_ids
    requests += [engine.add_request(p, n, dt.serve.SamplingParams(max_new_tokens=7)) for p, n in zip(prompts[1:], names[1:])]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in requests] == [hf_greedy(model, p, n, 12 if i == 0 else 7)
                                                for i, (p, n) in enumerate(zip(prompts, names))]


def test_requests_arriving_together_reuse_the_first_ones_prefix():
    """A burst sharing a system prompt: the first computes it, the others join one step later and reuse it."""
    model = _model()
    engine = Engine(model, byte_tokenizer(), max_batch_size=8)
    prompts, names = _prompts(6, seed=21), ["a"] * 6
    outs = engine.generate(prompts, names, max_new_tokens=4)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, n, 4) for p, n in zip(prompts, names)]
    assert engine.prefix_cache.hits >= 5 * 24
