"""Prefix tuning and P-tuning against the real peft package (config keys and GQA sizes, logits and loss with left
padding, files both ways, trainable and inference loads), greedy generation with the KV cache against greedy
decoding by full forward passes (never peft's generate()), use_cache=False, mixed batches, errors, training."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, attach_random, make_tiny_llama, no_grad_logits

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")  # peft warns about position ids and the hub at every step


def lively_llama(seed: int = 0):
    """The tiny Llama (GQA: 4 heads, 2 kv heads) with larger weights, so greedy generations differ per step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2)
    config._name_or_path = "tiny-llama"
    return LlamaForCausalLM(config).eval()


CASES = {  # ours, peft's
    "prefix": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=3),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix-projection": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
                          lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                          prefix_projection=True, encoder_hidden_size=16)),
    "p-tuning-mlp": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=3),
                     lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "p-tuning-lstm": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
                                                     encoder_hidden_size=8),
                      lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                       encoder_reparameterization_type="LSTM", encoder_hidden_size=8)),
}


def padded_batch():
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def copy_peft_encoder(model, peft_model) -> None:
    """Our live tensors from peft's prompt encoder (same module names below the part's own prefix)."""
    source = peft_model.prompt_encoder["default"].state_dict()
    with torch.no_grad():
        for key, tensor in dt.adapter_tensors(model, "default").items():
            if key == "prompt_embeddings":
                tensor.copy_(source["embedding.weight"])
            elif not key.endswith(".offset"):
                tensor.copy_(source[key.split(".", 1)[1]])


def perturbed(make, seed: int = 3):
    model = lively_llama()
    torch.manual_seed(seed)
    dt.attach(model, make())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, "default").values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_equal_peft_with_left_padding_and_the_config_is_peft_config(case, tmp_path):
    ours, theirs = CASES[case]
    model = dt.attach(lively_llama(), ours())
    peft_model = peft.get_peft_model(lively_llama(), theirs())
    copy_peft_encoder(model, peft_model)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask, labels=labels), peft_model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    peft_model.save_pretrained(tmp_path / "peft")
    dt.save_adapter(model, tmp_path / "ours")
    theirs_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours_json) == set(theirs_json) - {"peft_version"} or set(ours_json) == set(theirs_json)
    for key in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size", "num_transformer_submodules"):
        assert ours_json.get(key) == theirs_json.get(key), key  # prefix: GQA's d_kv = 16 x 2 kv heads = 32


@pytest.mark.parametrize("case", CASES)
def test_files_both_ways_inference_exact_and_trainable_keeps_the_encoder(case, tmp_path):
    ours, theirs = CASES[case]
    model = perturbed(ours)
    ids, mask, _ = padded_batch()
    expected = no_grad_logits(model, ids)
    dt.save_adapter(model, tmp_path / "ours")
    with safe_keys(tmp_path / "ours") as keys:
        assert keys == ["prompt_embeddings"]  # the derived output, never the encoder: peft's file
    peft_model = peft.PeftModel.from_pretrained(lively_llama(), tmp_path / "ours")
    torch.testing.assert_close(no_grad_logits(peft_model, ids), expected, atol=1e-5, rtol=1e-5)
    loaded = dt.load_adapter(lively_llama(), tmp_path / "ours")
    assert set(dt.adapter_tensors(loaded, "default")) == {"prompt_embeddings"}
    torch.testing.assert_close(no_grad_logits(loaded, ids), expected, atol=0, rtol=0)  # inference load: exact
    trainable = dt.load_adapter(lively_llama(), tmp_path / "ours", trainable=True)
    torch.testing.assert_close(no_grad_logits(trainable, ids), expected, atol=1e-5, rtol=1e-5)
    assert dt.trainable_parameters(trainable)[0] == dt.trainable_parameters(model)[0]  # the encoder came back
    peft_model.save_pretrained(tmp_path / "peft")
    from_peft = dt.load_adapter(lively_llama(), tmp_path / "peft")
    torch.testing.assert_close(no_grad_logits(from_peft, ids), expected, atol=1e-5, rtol=1e-5)


class safe_keys:
    def __init__(self, path):
        from safetensors import safe_open

        self.file = safe_open(str(path / "adapter_model.safetensors"), framework="pt")

    def __enter__(self):
        return sorted(self.file.keys())

    def __exit__(self, *exc):
        return False


def greedy_by_full_forwards(model, ids, mask, steps):
    """Greedy decoding with no cache: every step runs the whole sequence again (the oracle)."""
    out, mask = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(out, attention_mask=mask, use_cache=False).logits[:, -1]
            out = torch.cat((out, logits.argmax(-1, keepdim=True)), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("case", ["prefix", "prefix-projection", "p-tuning-lstm"])
def test_generate_with_the_kv_cache_equals_greedy_full_forwards_batched_with_left_padding(case):
    model = perturbed(CASES[case][0])
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generated, greedy_by_full_forwards(model, ids, mask, 6))
    for row in range(ids.shape[0]):  # batched equals each row alone (its padding removed)
        keep = mask[row].bool()
        alone = greedy_by_full_forwards(model, ids[row:row + 1, keep], mask[row:row + 1, keep], 6)
        if keep.all():
            assert torch.equal(alone, generated[row:row + 1])


def test_use_cache_false_and_true_give_the_same_logits_for_prefix():
    model = perturbed(CASES["prefix"][0])
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        cached = model(ids, attention_mask=mask, use_cache=True)
        plain = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(cached.logits, plain, atol=0, rtol=0)
    assert cached.past_key_values.get_seq_length() == 3 + ids.shape[1]  # the prefix, then the tokens


def test_mixed_batches_prefix_with_lora_and_base_rows_and_p_tuning_with_prompt_tuning():
    model = lively_llama()
    torch.manual_seed(1)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=3), "prefix")
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=8), "long")
    attach_random(model, "lora", 2)
    dt.attach(model, dt.PromptEncoderConfig(num_virtual_tokens=2), "ptune")
    dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=4), "prompt")
    ids = torch.randint(0, 256, (5, 7), generator=torch.Generator().manual_seed(4))
    assert_mixed_equals_alone(model, ids, ["prefix", None, "long", "lora", "prefix"])
    assert_mixed_equals_alone(model, ids, ["ptune", "prompt", None, "lora", "ptune"])
    with pytest.raises(ValueError, match="separate batches"), dt.route(model, ["prefix", "prompt", None, None, None]):
        model(ids)


def test_errors_name_the_field_before_anything_changes():
    for make, field in [(lambda: dt.PrefixTuningConfig(init_weights="gaussian"), "init_weights"),
                        (lambda: dt.PrefixTuningConfig(prefix_projection=1), "prefix_projection"),
                        (lambda: dt.PromptEncoderConfig(encoder_reparameterization_type="GRU"), "encoder_reparameterization_type"),
                        (lambda: dt.PromptEncoderConfig(encoder_num_layers=3), "encoder_num_layers"),
                        (lambda: dt.PromptEncoderConfig(encoder_dropout=1.5), "encoder_dropout"),
                        (lambda: dt.PrefixTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
                        (lambda: dt.PrefixTuningConfig(target_modules=["q_proj"]), "target_modules")]:
        with pytest.raises(dt.ConfigError, match=field):
            make()
    model = make_tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.ConfigError, match="context"):
        dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=128))
    with pytest.raises(dt.ConfigError, match="token_dim"):
        dt.attach(model, dt.PrefixTuningConfig(token_dim=48))
    assert not dt.adapter_configs(model) and model.state_dict().keys() == state.keys()


@pytest.mark.parametrize("case", ["prefix-projection", "p-tuning-mlp"])
def test_training_moves_the_encoder_and_the_loss_falls(case):
    model = dt.attach(lively_llama(), CASES[case][0]()).train()
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(6))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, params))  # every encoder tensor trained


def test_serve_runs_p_tuning_and_prefix_rows_beside_lora_and_base_rows():
    """The engine asks a part what it adds to a row: P-tuning's encoder output goes before the row's embeddings
    (`row_embeddings`), a prefix's keys and values over the row's first p cache positions (`row_key_values`)."""
    from deltatune.serve.engine import Engine
    from serve_helpers import add_lora, byte_tokenizer, hf_greedy, tiny_llama

    model, tok = tiny_llama(), byte_tokenizer()
    add_lora(model, "lora", 4, seed=1)
    torch.manual_seed(2)
    dt.attach(model, dt.PromptEncoderConfig(num_virtual_tokens=3), "ptune", activate=False)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2), "prefix", activate=False)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8),
              "prefix4", activate=False)
    for name in ("ptune", "prefix", "prefix4"):
        with torch.no_grad():
            for tensor in dt.adapter_tensors(model, name).values():
                tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    engine = Engine(model, tok)
    prompts = [[5, 9, 23, 41], [7, 7, 100, 3, 2], [60, 61], [12, 200, 31], [90, 91, 92, 93, 94, 95]]
    names = ["ptune", "lora", None, "prefix", "prefix4"]
    outs = engine.generate(prompts, names, max_new_tokens=5)
    expected = [greedy_by_full_forwards_alone(model, p, n, 5) for p, n in zip(prompts, names)]
    assert [o.token_ids for o in outs] == expected
    assert len({tuple(o.token_ids) for o in outs}) == len(outs)  # every adapter changes the tokens
    assert outs[3].token_ids == hf_greedy(model.eval(), prompts[3], "prefix", 5)


def greedy_by_full_forwards_alone(model, prompt, name, steps):
    previous = dt.active_adapters(model)
    ids = torch.tensor([prompt])
    try:
        if name is None:
            with dt.disable_adapters(model):
                return greedy_by_full_forwards(model, ids, torch.ones_like(ids), steps)[0].tolist()
        dt.set_active(model, name)
        return greedy_by_full_forwards(model, ids, torch.ones_like(ids), steps)[0].tolist()
    finally:
        dt.set_active(model, previous)


def test_a_training_forward_keeps_no_cache_and_gradient_checkpointing_is_refused():
    model = perturbed(CASES["prefix"][0]).train()
    ids, mask, labels = padded_batch()
    losses = []
    for _ in range(2):  # nothing accumulates between forwards (the prefix-only cache stores nothing new)
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == losses[1]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient_checkpointing: false"):
        model(ids, attention_mask=mask, labels=labels)


def test_a_training_config_with_prefix_and_gradient_checkpointing_is_refused_before_loading(tmp_path):
    from deltatune.core.config import ConfigError
    from deltatune.train.loop import train

    for policy in (True, "selective"):
        with pytest.raises(ConfigError, match="gradient_checkpointing: prefix tuning .* set gradient_checkpointing: false"):
            train(model=str(tmp_path / "never-read"), adapter={"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4},
                  gradient_checkpointing=policy, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_mam_adapter_is_a_prefix_and_a_parallel_ffn_adapter_active_together():
    """He et al. 2022's MAM adapter (METHODS.md §10): prefix tuning on attention plus a parallel adapter on the FFN,
    two adapters stacked; at the start it is the prefix alone (the parallel adapter's W_up = 0), and both train."""
    model = lively_llama()
    torch.manual_seed(0)
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=4), "prefix")
    dt.attach(model, dt.ParallelAdapterConfig(reduction_factor=1, scaling=4.0), "ffn")  # m = d: a large bottleneck
    ids, mask, labels = padded_batch()
    dt.set_active(model, "prefix")
    prefix_alone = no_grad_logits(model, ids)
    dt.set_active(model, ["prefix", "ffn"])
    torch.testing.assert_close(no_grad_logits(model, ids), prefix_alone, atol=0, rtol=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(t) for n in ("prefix", "ffn") for t in dt.adapter_tensors(model, n).values()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert not torch.allclose(no_grad_logits(model, ids), prefix_alone)
    assert (dt.adapter_tensors(model, "ffn")["base_model.model.model.layers.0.mlp.adapter_up.weight"] != 0).any()


class _KillAt:
    def __init__(self, step):
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            raise KeyError("killed")


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("adapter", [{"peft_type": "P_TUNING", "num_virtual_tokens": 3},
                                     {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "prefix_projection": True,
                                      "encoder_hidden_size": 16}], ids=["p-tuning", "prefix-projection"])
def test_resume_through_train_is_bitwise_the_checkpoints_keep_the_encoder(tmp_path, adapter, quantize):
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    from deltatune.train.loop import train

    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(6)))}

    def run(name, **values):
        return train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / name), data=data,
                     adapter=adapter, max_steps=6, batch_size=2, save_every=2, precision="fp32", quantize=quantize,
                     optim={"lr": 1e-2}, **values)

    full = run("full")
    with pytest.raises(KeyError):
        run("cut", hooks=[_KillAt(5)])
    resumed = run("cut", resume=True)
    assert resumed.losses == {s: full.losses[s] for s in (5, 6)}  # the encoder came back from the checkpoint
    (ca, a, _), (cb, b, _) = dt.read_adapter(resumed.adapter_dir), dt.read_adapter(full.adapter_dir)
    assert ca == cb and list(a) == ["prompt_embeddings"] and torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
