"""Proxy-tuning: logits s_M + α(s_M⁺ − s_M⁻), decoded in lockstep with continuous batching."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.serve import Engine
from deltatune.serve.proxy import ProxyEngine, truncated_twin
from serve_helpers import add_lora, byte_tokenizer, tiny_llama


def _greedy_proxy(base, expert, anti, ids, n, alpha=1.0):
    """The formula, with full forwards over the whole prefix at every step (no cache)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            s = base(x).logits[0, -1] + alpha * (expert(x).logits[0, -1] - anti(x).logits[0, -1])
        out.append(int(s.argmax()))
        ids.append(out[-1])
    return out


def test_proxy_decoding_follows_the_formula():
    tok = byte_tokenizer()
    base, small = tiny_llama(seed=0), tiny_llama(seed=1)
    add_lora(small, "tuned", 4, seed=5)
    prompts = [[5, 6, 7, 8], [100, 3], [9] * 11]
    engine = ProxyEngine(base, tok, expert=(small, "tuned"), anti_expert=(small, None), alpha=0.8)
    outs = engine.generate(prompts, max_new_tokens=6)

    dt.set_active(small, "tuned")
    expert = small
    anti = tiny_llama(seed=1)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _greedy_proxy(base, expert, anti, prompt, 6, alpha=0.8)
    # α = 0 is the base alone
    plain = Engine(base, tok).generate(prompts, max_new_tokens=6)
    zero = ProxyEngine(base, tok, expert=(small, "tuned"), anti_expert=(small, None), alpha=0.0)
    assert [o.token_ids for o in zero.generate(prompts, max_new_tokens=6)] == [o.token_ids for o in plain]


def test_vocabularies_must_match():
    base, other = tiny_llama(vocab=259), tiny_llama(vocab=300)
    with pytest.raises(ValueError, match="one vocabulary: the expert has 300 tokens, the base 259"):
        ProxyEngine(base, None, expert=(other, None), anti_expert=(other, None))


def test_truncated_twin_shares_nothing_with_the_model():
    model = tiny_llama()
    twin = truncated_twin(model, 1)
    assert len(twin.model.layers) == 1 and len(model.model.layers) == 2 and twin.config.num_hidden_layers == 1
    assert model.config.num_hidden_layers == 2
    add_lora(twin, "t", 2, seed=0)
    assert not dt.adapters(model)
    assert twin.model.layers[0].self_attn.q_proj is not model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        twin(torch.tensor([[1, 2, 3]]))
