"""Prompt tuning against the real peft package (config keys, initialisation, logits, files both ways, greedy
generation with left padding), mixed batches against running each row alone, and training from Python and
from `deltatune train`."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.train.loss import causal_lm_loss

from conftest import assert_unchanged, capture_state, logits_alone, make_seq_cls, make_tiny_llama, no_grad_logits
from test_cli import chats, model_dir, run  # noqa: F401  (fixtures: a saved tiny Llama + tokenizer, chat data)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported")  # peft says it at every step

P = 5


def lively_llama(seed: int = 0):
    """The tiny Llama with larger weights (initializer_range 0.2), so greedy generations differ per row and step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2)
    config._name_or_path = "tiny-llama"
    return LlamaForCausalLM(config).eval()


def peft_prompt(model, **kwargs):
    kwargs.setdefault("num_virtual_tokens", P)
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", **kwargs))


def padded_batch():
    """(ids, attention_mask, labels): 3 rows of 9, the first two left-padded, labels -100 on the padding."""
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def prompt(model, name: str = "default") -> torch.Tensor:
    return model.deltatune_parts[name].prompt_embeddings


def perturb(model, name: str, seed: int) -> None:
    with torch.no_grad():
        prompt(model, name).normal_(generator=torch.Generator().manual_seed(seed))


# ---- the config: peft's keys, checked values -------------------------------------------------------------
def test_saved_config_is_peft_config(tmp_path):
    peft_prompt(lively_llama()).save_pretrained(tmp_path / "peft")
    model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
    dt.save_adapter(model, tmp_path / "dt")
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("dt", "peft"))
    assert ours == theirs
    assert dt.registered_methods()["PROMPT_TUNING"].readers == ("peft", "deltatune")


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init"),
    ({"prompt_tuning_init": "TEXT"}, "prompt_tuning_init_text"),
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "the cat"}, "tokenizer_name_or_path"),
    ({"tokenizer_kwargs": {"use_fast": True}}, "tokenizer_kwargs"),
    ({"target_modules": ["q_proj"]}, "target_modules"),
    ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ({"task_type": "SEQ_CLS"}, "task_type"),
])
def test_config_errors_name_the_key(kwargs, named):
    with pytest.raises(dt.ConfigError, match=named):
        dt.PromptTuningConfig(**kwargs)


@pytest.mark.parametrize(("make", "config", "named"), [
    (make_tiny_llama, dt.PromptTuningConfig(token_dim=32), "token_dim is 32"),
    (make_seq_cls, dt.PromptTuningConfig(), "not a causal LM"),
])
def test_attach_refuses_what_does_not_fit_and_changes_nothing(make, config, named):
    model = make()
    saved = capture_state(model)
    with pytest.raises(dt.ConfigError, match=named):
        dt.attach(model, config)
    assert_unchanged(model, saved)


# ---- initialisation, as peft draws it ------------------------------------------------------------------
@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_initialisation_draws_as_peft(init):
    torch.manual_seed(3)
    theirs = peft_prompt(lively_llama(), prompt_tuning_init=init).prompt_encoder.default.embedding.weight
    torch.manual_seed(3)
    ours = prompt(dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init=init)))
    assert torch.equal(ours, theirs)


def test_text_initialisation_by_name_as_peft_and_by_tokenizer_object(model_dir):
    from transformers import AutoTokenizer

    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="the cat sat")
    theirs = peft_prompt(lively_llama(), tokenizer_name_or_path=str(model_dir), **text).prompt_encoder.default
    ours = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P, tokenizer_name_or_path=str(model_dir),
                                                            **text))
    assert torch.equal(prompt(ours), theirs.embedding.weight)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = dt.PromptTuningConfig(num_virtual_tokens=P, tokenizer=tokenizer, **text)
    assert config.tokenizer_name_or_path == tokenizer.name_or_path  # so that peft can read the file
    model = dt.attach(lively_llama(), config)
    ids = tokenizer("the cat sat")["input_ids"]
    expected = model.get_input_embeddings()(torch.tensor((ids * 2)[:P]))  # repeated, then cut to p
    assert torch.equal(prompt(model), expected)


# ---- parity with peft: logits, files both ways, generation -----------------------------------------------
def test_peft_file_loads_with_the_same_logits_and_loss(tmp_path):
    peft_prompt(lively_llama(), prompt_tuning_init="SAMPLE_VOCAB").save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(lively_llama(), tmp_path)
    ours = dt.load_adapter(lively_llama(), tmp_path)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits.shape == (3, P + 9, 256)
    assert (a.logits - b.logits).abs().max() <= 1e-5
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_our_file_loads_in_peft_with_the_same_logits(tmp_path):
    model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
    perturb(model, "default", 1)
    dt.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(lively_llama(), tmp_path)
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        diff = theirs(input_ids=ids, attention_mask=mask).logits - model(input_ids=ids, attention_mask=mask).logits
    assert diff.abs().max() <= 1e-5


def test_greedy_generation_with_left_padding_equals_peft_full_forwards(tmp_path):
    """peft's forward is the oracle, its generate() is not (under transformers 5.25 it prepends the prompt at
    every decode step): our cached generate() equals greedy decoding by full forward passes of peft's model."""
    peft_prompt(lively_llama()).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(lively_llama(), tmp_path)
    ours = dt.load_adapter(lively_llama(), tmp_path)
    ids, mask, _ = padded_batch()
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = greedy_by_full_forwards(theirs, ids, mask, 12)
    got = ours.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)
    assert not torch.equal(got, lively_llama().generate(input_ids=ids, attention_mask=mask, **settings))


# ---- the adapter's life: disable, delete, several prompts ------------------------------------------------
def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_disable_delete_and_unload_give_back_the_base():
    ids, mask, _ = padded_batch()
    base = no_grad_logits(lively_llama(), ids)
    for remove in (lambda m: dt.delete_adapter(m, "default"), dt.unload):
        model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
        assert hook_count(model) == 2  # the decoder's (embeddings, mask) and the root's (labels)
        with dt.disable_adapters(model):
            torch.testing.assert_close(no_grad_logits(model, ids), base, atol=0, rtol=0)
        assert no_grad_logits(model, ids).shape == (3, P + 9, 256)
        remove(model)
        assert hook_count(model) == 0 and not hasattr(model, "deltatune_parts")
        torch.testing.assert_close(no_grad_logits(model, ids), base, atol=0, rtol=0)


def test_two_prompt_adapters_one_active_at_a_time_and_either_can_go():
    ids = padded_batch()[0]
    model = lively_llama()
    for name, p, seed in (("a", 3, 1), ("b", 4, 2)):
        dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=p), name)
        perturb(model, name, seed)
    alone = {}
    for name, p, seed in (("a", 3, 1), ("b", 4, 2)):
        single = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=p), name)
        perturb(single, name, seed)
        alone[name] = no_grad_logits(single, ids)
        torch.testing.assert_close(logits_alone(model, ids, name), alone[name], atol=1e-6, rtol=1e-6)
    dt.set_active(model, ["a", "b"])
    with pytest.raises(ValueError, match="active together"):
        model(ids)
    dt.delete_adapter(model, "a")  # "a" served both; "b" takes over
    torch.testing.assert_close(logits_alone(model, ids, "b"), alone["b"], atol=1e-6, rtol=1e-6)


def test_merge_folds_nothing_and_merge_and_unload_refuses_to_drop_the_prompt():
    ids = padded_batch()[0]
    model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = no_grad_logits(model, ids)
    dt.merge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(no_grad_logits(model, ids), before, atol=0, rtol=0)  # the prompt is still prepended
    with pytest.raises(dt.NotMergeableError, match="PROMPT_TUNING"):
        dt.merge_and_unload(model)  # a plain model cannot carry the virtual tokens: refused, nothing lost
    torch.testing.assert_close(no_grad_logits(model, ids), before, atol=0, rtol=0)
    plain = dt.unload(model)  # without merging: the base, on purpose
    torch.testing.assert_close(no_grad_logits(plain, ids), no_grad_logits(lively_llama(), ids), atol=0, rtol=0)


# ---- mixed batches -------------------------------------------------------------------------------------
def mixed_model():
    """Prompts "a" (p=3) and "b" (p=5), a random LoRA "c", on one model."""
    model = lively_llama()
    for name, p, seed in (("a", 3, 1), ("b", 5, 2)):
        dt.attach(model, dt.PromptTuningConfig(num_virtual_tokens=p), name)
        perturb(model, name, seed)
    torch.manual_seed(3)
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "c")
    return model


def run_alone(model, name, **inputs):
    """Logits with only adapter `name` active (None: adapters disabled); the active set is restored."""
    previous = dt.active_adapters(model)
    with torch.no_grad():
        if name is None:
            with dt.disable_adapters(model):
                return model(**inputs).logits
        dt.set_active(model, name)
        out = model(**inputs).logits
    dt.set_active(model, previous)
    return out


def test_mixed_batch_rows_equal_running_alone():
    model = mixed_model()
    ids, mask, _ = padded_batch()
    ids, mask = torch.cat((ids, ids[:2])), torch.cat((mask, mask[:2]))
    names = ["a", "c", None, "b", "b"]
    with dt.route(model, names), torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask).logits
    assert mixed.shape == (5, 5 + 9, 256)  # the longest prompt
    for row, name in enumerate(names):
        alone = run_alone(model, name, input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1])
        real = mask[row].bool()
        torch.testing.assert_close(mixed[row, -9:][real], alone[0, -9:][real], atol=1e-5, rtol=1e-5)


def test_mixed_batch_trains_every_routed_adapter():
    model = mixed_model()
    dt.set_active(model, ["a", "b", "c"])  # trainable; route chooses per row
    ids, mask, labels = padded_batch()
    with dt.route(model, ["a", "b", "c"]):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    lora_b = model.model.layers[0].self_attn.q_proj.deltas["c"].lora_B.weight
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (prompt(model, "a"), prompt(model, "b"), lora_b))


def test_mixed_greedy_generation_equals_each_row_alone():
    model = mixed_model()
    ids, mask, _ = padded_batch()
    names = ["b", None, "a"]
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with dt.route(model, names):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **settings)
    for row, name in enumerate(names):
        with dt.route(model, [name]):
            alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **settings)
        assert torch.equal(mixed[row], alone[0]), row


def test_gpt2_absolute_positions_peft_parity_and_mixed_rows(tmp_path):
    """GPT-2 adds learned absolute positions: the mixed batch must number each row as if it ran alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()

    peft_prompt(gpt2(), num_virtual_tokens=4).save_pretrained(tmp_path)
    theirs, ours = peft.PeftModel.from_pretrained(gpt2(), tmp_path), dt.load_adapter(gpt2(), tmp_path)
    ids, mask, _ = padded_batch()
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **settings),
                       greedy_by_full_forwards(theirs, ids, mask, 8))
    dt.attach(ours, dt.PromptTuningConfig(num_virtual_tokens=2), "short")
    names = ["short", None, "default"]
    with dt.route(ours, names), torch.no_grad():
        mixed = ours(input_ids=ids, attention_mask=mask).logits
    for row, name in enumerate(names):
        alone = run_alone(ours, name, input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1])
        real = mask[row].bool()
        torch.testing.assert_close(mixed[row, -9:][real], alone[0, -9:][real], atol=1e-5, rtol=1e-5)


def test_refused_inputs_say_why():
    model = dt.attach(make_tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=2))
    ids = torch.randint(0, 256, (1, 6))
    with pytest.raises(ValueError, match="packing"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    with pytest.raises(ValueError, match="per row"), dt.route(model, ["default"] * 6, per_token=True):
        model(input_ids=ids)


# ---- training ------------------------------------------------------------------------------------------
def test_chunked_loss_equals_the_model_loss_and_loss_falls():
    model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
    ids, mask, labels = padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    total, n = causal_lm_loss(model, batch, chunk_size=4)
    assert n == int((labels != -100).sum())  # the first token too: the last virtual position predicts it (peft)
    torch.testing.assert_close(total / n, model(**batch).loss, atol=1e-5, rtol=1e-5)
    model.train()
    optimizer = torch.optim.AdamW([prompt(model)], lr=3e-2)  # the recommended range: 3e-2 to 3e-1
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


def test_deltatune_train_with_prompt_tuning_then_eval(tmp_path, model_dir, chats, capsys):  # noqa: F811
    out_dir = tmp_path / "run"
    code, out, err = run(["train", "--model", str(model_dir), "--data.train", str(chats), "--output_dir", str(out_dir),
                          "--adapter.peft_type", "PROMPT_TUNING", "--adapter.num_virtual_tokens", "4",
                          "--optim.lr", "3e-2", "--optim.schedule", "constant", "--max_steps", "8", "--batch_size", "3",
                          "--precision", "fp32"], capsys)
    assert code == 0, err
    config, tensors, _ = dt.read_adapter(out_dir / "adapter")
    assert isinstance(config, dt.PromptTuningConfig) and config.token_dim == 64
    assert set(tensors) == {"prompt_embeddings"} and tensors["prompt_embeddings"].shape == (4, 64)
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    code, out, err = run(["eval", "--base", str(model_dir), "--adapter", str(out_dir / "adapter"), "--data", str(chats),
                          "--max-new-tokens", "3", "--match", "contains"], capsys)
    assert code == 0, err
    assert "perplexity" in out


# ---- generation against its definition: greedy decoding by full forward passes --------------------------
def greedy_by_full_forwards(model, ids, mask, steps: int, pad: int = 0) -> torch.Tensor:
    """Greedy decoding as defined: each step one forward over the whole sequence, no cache, argmax appended
    (`pad` after a row's end-of-sequence token, as generate() does)."""
    eos = model.config.eos_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        token = logits[:, -1].argmax(-1).masked_fill(done, pad)
        done |= token == eos
        ids = torch.cat((ids, token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


def test_generate_equals_greedy_decoding_by_full_forward_passes():
    """The oracle is the definition, not peft's generate() (which prepended the prompt at every decode step
    under transformers 5.25, as deltatune did): cached decoding must give the tokens of full forwards."""
    model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
    perturb(model, "default", seed=3)
    ids, mask, _ = padded_batch()
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, greedy_by_full_forwards(model, ids, mask, 10))


@pytest.mark.parametrize("key", ["past_key_values", "cache"])
def test_a_decode_step_prepends_nothing_whatever_the_cache_is_called(key):
    """transformers 5.25 hands the decoder its cache as `cache=`; either name marks a decode step."""
    from transformers import DynamicCache

    model = dt.attach(lively_llama(), dt.PromptTuningConfig(num_virtual_tokens=P))
    decoder, part = model.get_decoder(), model.deltatune_parts["default"]
    cache = DynamicCache()
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.25: cache
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **{name: cache})
    assert cache.get_seq_length() == P + 3
    _, kwargs = part._decoder_hook(model, decoder, (), {"input_ids": torch.tensor([[4]]), key: cache,
                                                        "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert kwargs.get("inputs_embeds") is None and kwargs["input_ids"].shape == (1, 1)  # no prompt in front again
    assert kwargs["attention_mask"].shape == (1, P + 4)
