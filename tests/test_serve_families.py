"""Model families beyond Llama: Qwen2, Qwen3, Mistral (with and without a sliding window), Gemma 1 and 2, each a tiny
random model whose engine output (LoRA rows and base rows in one batch) equals transformers' generate() with
the same adapter alone; anything else is refused by name."""
from __future__ import annotations

import pytest
import torch

import transformers
from deltatune.serve import Engine, check_servable
from serve_helpers import add_lora, hf_greedy

COMMON = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, eos_token_id=258,
              bos_token_id=256, pad_token_id=256, tie_word_embeddings=True)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6,
                                                               max_window_layers=1)),  # layer 1 slides, layer 0 not
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=6, tie_word_embeddings=False,
                                                         final_logit_softcapping=4.0,
                                                         attn_logit_softcapping=3.0)),  # caps that bite; untied: a tied
    # head over its x8-scaled embedding just repeats the last token at this size
}


def _model(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    model.generation_config.eos_token_id = 258
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_generate_with_the_same_adapter(family):
    model = _model(family)
    add_lora(model, "a", r=4, seed=1, targets=("q_proj", "v_proj", "down_proj"))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (3, 11, 17)]  # past the window of 6
    names = ["a", None, "a"]
    outs = Engine(model, max_batch_size=8).generate(prompts, names, max_new_tokens=9)
    expected = [hf_greedy(model, p, n, 9) for p, n in zip(prompts, names)]
    assert [o.token_ids for o in outs] == expected
    assert any(outs[i].token_ids != hf_greedy(model, prompts[i], None, 9) for i in (0, 2))  # the adapter counts


def test_sliding_window_changes_the_output():
    """The window is applied: the same weights with and without it generate differently after 6 tokens."""
    plain, sliding = _model("mistral"), _model("mistral-sliding")
    sliding.load_state_dict(plain.state_dict())
    prompt = list(range(40, 60))
    a = Engine(plain).generate([prompt], max_new_tokens=6)[0].token_ids
    b = Engine(sliding).generate([prompt], max_new_tokens=6)[0].token_ids
    assert a != b and b == hf_greedy(sliding, prompt, None, 6)


@pytest.mark.parametrize("config_cls, model_cls, extra, name", [
    ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16), "gemma3_text"),
    ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4), "gpt2"),
])
def test_other_families_are_refused_by_name(config_cls, model_cls, extra, name):
    kwargs = {**COMMON, **extra} if name != "gpt2" else dict(vocab_size=259, **extra)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    with pytest.raises(TypeError, match=f"'{name}'"):
        check_servable(model)


def test_gemma2_final_logits_are_soft_capped():
    """Greedy tokens cannot see a monotone cap; the log-probabilities do: they equal the model's own forward."""
    from deltatune.serve import SamplingParams

    model = _model("gemma2")
    prompt = list(range(40, 52))
    engine = Engine(model)
    request = engine.add_request(prompt, None, SamplingParams(max_new_tokens=3, logprobs=0))
    while engine.has_unfinished():
        engine.step()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + request.output_ids])).logits[0], dim=-1)
    expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(request.output_ids)]
    assert [lp for _, lp, _ in request.logprobs] == pytest.approx(expected, abs=1e-4)
