"""The serving engine: continuous batching of mixed adapters gives every request the tokens it gets alone."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.adapter import resolve
from deltatune.serve import Engine, RequestError, SamplingParams
from deltatune.serve.registry import blend_lora
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def served():
    model = tiny_llama()
    for name, r, seed in (("r2", 2, 1), ("r4", 4, 2), ("r8", 8, 3)):
        add_lora(model, name, r, seed)
    return model, byte_tokenizer()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def test_mixed_batch_with_arrivals_matches_each_request_alone(served):
    model, tok = served
    engine = Engine(model, tok, max_batch_size=6)  # 10 requests: some wait for a slot to free
    prompts, names = _prompts(10), ["r2", None, "r8", "r4", "r2", None, "r8", "r4", "r4", None]
    lengths = [9, 4, 12, 7, 3, 10, 6, 11, 5, 8]  # requests leave at different steps (slots get compacted)
    requests = []
    schedule = {0: range(0, 3), 2: range(3, 6), 3: range(6, 8), 7: range(8, 10)}  # step -> arriving requests
    step = 0
    while step in schedule or engine.has_unfinished() or step < max(schedule):
        for i in schedule.get(step, ()):
            requests.append(engine.add_request(prompts[i], names[i], SamplingParams(max_new_tokens=lengths[i])))
        engine.step()
        step += 1
    for request, prompt, name, n in zip(requests, prompts, names, lengths):
        assert request.output_ids == hf_greedy(model, prompt, name, n), (name, prompt)
        assert request.finish_reason == "length"
    assert engine.running == [] and not engine.waiting


def test_batched_prefill_padding_and_long_prompts(served):
    model, tok = served
    engine = Engine(model, tok, max_prefill_tokens=64)  # prompts of 3..60 tokens: admitted over several steps
    prompts = [p * 4 for p in _prompts(6, seed=5)]
    names = ["r8", "r2", None, "r4", "r8", None]
    outs = engine.generate(prompts, names, max_new_tokens=5)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, n, 5) for p, n in zip(prompts, names)]


def test_matches_peft_generation(served, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = served
    dt.save_adapter(model, tmp_path / "r4", "r4")
    reference = tiny_llama()
    peft_model = peft.PeftModel.from_pretrained(reference, str(tmp_path / "r4")).eval()
    prompts = _prompts(3, seed=7)
    engine = Engine(model, tok)
    outs = engine.generate(prompts, ["r4", "r4", None], max_new_tokens=8)
    for prompt, out in zip(prompts[:2], outs):
        with torch.no_grad():
            expected = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                           pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
        assert out.token_ids == expected


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    model, tok = served
    params = dict(max_new_tokens=10, temperature=0.9, top_p=0.8, seed=1234)
    prompt = _prompts(1, seed=9)[0]
    alone = Engine(model, tok).generate([prompt], ["r2"], **params)[0].token_ids
    crowd = Engine(model, tok).generate([*_prompts(4, seed=11), prompt], ["r8", None, "r4", "r2", "r2"], **params)
    assert crowd[-1].token_ids == alone
    other_seed = Engine(model, tok).generate([prompt], ["r2"], **{**params, "seed": 99})[0].token_ids
    assert other_seed != alone


def test_stop_strings_eos_and_text(served):
    model, tok = served
    engine = Engine(model, tok)
    full = engine.generate(["hello"], ["r4"], max_new_tokens=12)[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[3:5]
    cut = engine.generate(["hello"], ["r4"], max_new_tokens=12, stop=[stop])[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    # eos ends a request: make the base always answer eos
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        saved = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] = 10 * model.lm_head.weight.abs().max()  # tied: eos also gets a huge embedding
    try:
        out = Engine(model, tok).generate(["hello"], [None], max_new_tokens=12)[0]
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] = saved
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and len(out.token_ids) < 12


def test_abort_frees_the_slot(served):
    model, tok = served
    engine = Engine(model, tok)
    a = engine.add_request([1, 2, 3], "r2", SamplingParams(max_new_tokens=50))
    b = engine.add_request([4, 5, 6], "r8", SamplingParams(max_new_tokens=6))
    engine.step()
    engine.abort(a.id)
    engine.step()
    assert a.finish_reason == "abort" and engine.running == [b] and b.slot == 0
    while engine.has_unfinished():
        engine.step()
    assert b.output_ids == hf_greedy(model, [4, 5, 6], "r8", 6)


def test_requests_that_cannot_run_are_refused(served):
    model, tok = served
    engine = Engine(model, tok, max_model_len=32)
    with pytest.raises(RequestError, match="maximum context length is 32"):
        engine.add_request(list(range(30)), None, SamplingParams(max_new_tokens=8))
    with pytest.raises(RequestError, match="no adapter named 'nope'"):
        engine.add_request([1, 2], "nope")
    with pytest.raises(RequestError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_new_tokens=-1)
    assert not engine.has_unfinished()


def test_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="Llama-family causal LMs.*gpt2"):
        Engine(gpt2)


def test_blend_is_the_weighted_sum_of_deltas(served):
    model, tok = served
    name = blend_lora(model, {"r2": 0.7, "r8": -0.5}, "blend_test")
    try:
        for path, delta in dt.adapters(model)[name].deltas(model):
            site = model.get_submodule(resolve(model, path))
            expected = 0.7 * site.deltas["r2"].delta_weight() - 0.5 * site.deltas["r8"].delta_weight()
            torch.testing.assert_close(delta.delta_weight(), expected, rtol=1e-5, atol=1e-6)
        engine = Engine(model, tok)
        prompt = _prompts(1, seed=3)[0]
        single = engine.generate([prompt, prompt], [{"r4": 1.0}, "r4"], max_new_tokens=8)
        assert single[0].token_ids == single[1].token_ids
    finally:
        dt.delete_adapter(model, name)
        for spec in list(engine._blends.values()):
            dt.delete_adapter(model, spec)


def test_stacked_lora_and_routed_adapters_share_a_batch(served):
    """Plain LoRA rows take the stacked product; an adapter with a trained copy of the head takes the core's
    routed path; dropout is off (adapters attach in training mode, the engine serves in eval mode)."""
    model, tok = served
    torch.manual_seed(4)
    dt.attach(model, dt.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.5, target_modules=["q_proj", "k_proj"],
                                   modules_to_save=["lm_head"], init_lora_weights=False), "saved", activate=False)
    with torch.no_grad():
        model.lm_head.modules_to_save["saved"].weight.mul_(1.5)
    try:
        engine = Engine(model, tok)
        assert engine.fused.eligible("r2") and not engine.fused.eligible("saved")
        prompts, names = _prompts(5, seed=21), ["r2", "saved", None, "r8", "saved"]
        fused = [o.token_ids for o in engine.generate(prompts, names, max_new_tokens=7)]
        routed = [o.token_ids for o in Engine(model, tok, fused_lora=False).generate(prompts, names, max_new_tokens=7)]
        expected = [hf_greedy(model.eval(), p, n, 7) for p, n in zip(prompts, names)]
        assert fused == expected and routed == expected
    finally:
        dt.delete_adapter(model, "saved")


def test_a_4bit_base_serves_too():
    quant = pytest.importorskip("deltatune.quant")
    model = tiny_llama()
    quant.quantize_model(model, compute_dtype=torch.float32)
    add_lora(model, "a", 4, seed=1)
    add_lora(model, "b", 2, seed=2)
    prompts, names = _prompts(3, seed=2), ["a", None, "b"]
    outs = Engine(model, byte_tokenizer()).generate(prompts, names, max_new_tokens=6)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, n, 6) for p, n in zip(prompts, names)]


def test_per_layer_ranks_and_scales(served):
    """rank_pattern/alpha_pattern: ranks and scales differ by site, in both kernels (prefill and decode)."""
    model, tok = served
    torch.manual_seed(6)
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
                           rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3.0})
    dt.attach(model, config, "patterned", activate=False)
    try:
        prompts, names = _prompts(4, seed=31), ["patterned", "r4", None, "patterned"]
        outs = Engine(model, tok).generate(prompts, names, max_new_tokens=6)
        assert [o.token_ids for o in outs] == [hf_greedy(model, p, n, 6) for p, n in zip(prompts, names)]
    finally:
        dt.delete_adapter(model, "patterned")


def test_dora_ia3_bottleneck_and_prompt_tuning_share_a_batch_with_lora(served):
    """Every method the core can mix serves in one batch: weight and block adapters through deltatune.route,
    prompt tuning's virtual tokens prepended by the engine (3 and 5 of them: rows of different widths)."""
    model, tok = served
    torch.manual_seed(8)
    configs = {
        "dora": dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                              init_lora_weights=False),
        "ia3": dt.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False),
        "bottleneck": dt.BottleneckConfig(reduction_factor=8),
    }
    for name, config in configs.items():
        dt.attach(model, config, name, activate=False)
    with torch.no_grad():
        for path, delta in dt.adapters(model)["bottleneck"].deltas(model):
            for p in delta.parameters():
                p.normal_(0, 0.3)  # far from the identity, so the adapter changes tokens
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=3), "prompt", activate=False)
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=5), "prompt5", activate=False)
    try:
        engine = Engine(model, tok)
        names = ["dora", "ia3", "r4", None, "bottleneck", "prompt", "dora", "prompt5", "r2"]
        prompts = _prompts(len(names), seed=41)
        outs = engine.generate(prompts, names, max_new_tokens=6)
        assert [o.token_ids for o in outs] == [hf_greedy(model.eval(), p, n, 6) for p, n in zip(prompts, names)]
        assert len({tuple(o.token_ids) for o in outs[:6]}) == 6
    finally:
        for name in [*configs, "prompt", "prompt5"]:
            dt.delete_adapter(model, name)
