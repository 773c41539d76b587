"""Evaluation on the tiny Llama: loss against a direct cross-entropy, batched left-padded generation against
one prompt at a time, matching rules, and a trained adapter that turns a 0 score into 1."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from deltatune.data import tokenize
from deltatune.data.records import DataError
from deltatune.train.evaluate import (
    eval_generation, eval_loss, generate_batch, is_match, normalize, prompt_and_reference,
)

from conftest import make_tiny_llama

WORDS = "the a cat dog sat ran on under mat log red blue big small and then".split()
SPECIALS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over WORDS with pad, eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat(prompt: str, answer: str | None = None, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"messages": messages + ([{"role": "assistant", "content": answer}] if answer else [])}


def test_normalize_and_match():
    assert normalize("  a \n\t b  ") == "a b"
    assert is_match(' {"a": 1}\n', '{"a":  1}', "exact")
    assert not is_match('{"A": 1}', '{"a": 1}', "exact")  # case is part of a formatted answer
    assert is_match("the answer is  Lyon.", "Lyon", "contains")
    assert not is_match("Lyon", "the answer is Lyon", "contains")
    with pytest.raises(ValueError, match="one of 'exact', 'contains', 'json'"):
        is_match("a", "a", "fuzzy")


def test_json_match_forgives_layout_not_types():
    reference = '{"name": "Ada", "age": 34}'
    assert is_match('Sure:\n```json\n{\n  "age": 34,\n  "name": "Ada"\n}\n```', reference, "json")
    assert not is_match('{"name": "Ada", "age": "34"}', reference, "json")
    assert not is_match('{"name": "Ada", "age": 34', reference, "json")  # unfinished
    assert is_match('[1, {"a": 2}]', "[1, {\"a\": 2}]", "json")
    with pytest.raises(ValueError, match="needs references that hold JSON"):
        is_match("{}", "Lyon", "json")


def test_prompt_and_reference_forms():
    prompt, reference = prompt_and_reference(chat("the cat", "sat", system="big"))
    assert reference == "sat" and [m["role"] for m in prompt] == ["system", "user"]
    assert prompt_and_reference(chat("the cat")) == ([{"role": "user", "content": "the cat"}], None)
    assert prompt_and_reference({"prompt": "the", "completion": "cat"}) == ("the", "cat")
    assert prompt_and_reference({**chat("the cat", "sat on the mat"), "reference": "mat"})[1] == "mat"
    with pytest.raises(DataError, match="needs `messages` or `prompt`.*text"):
        prompt_and_reference({"text": "the cat"}, "x.jsonl:3")


def test_eval_loss_equals_direct_cross_entropy(tokenizer):
    model = make_tiny_llama()
    records = [chat("the cat", "sat on the mat"), chat("a dog", "ran"), chat("the big red dog", "sat under a log")]
    examples, _ = tokenize(records, tokenizer, format="messages", max_length=64)
    got = eval_loss(model, tokenizer, examples, batch_size=2, chunk_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one at a time, unpadded, every logit at once
            logits = model(torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert model.training is False


def test_batched_left_padded_generation_equals_one_at_a_time(tokenizer):
    model = make_tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: run every row the full length
    prompts = [tokenizer(t)["input_ids"] for t in ("the cat sat", "a", "the big red dog ran on the", "blue mat")]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=6)
    alone = [generate_batch(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert all(len(text.split()) == 6 for text in batched)


def test_eval_generation_scores_only_records_with_references(tokenizer):
    model = make_tiny_llama()
    records = [chat("the cat", "sat"), chat("the dog"), {"prompt": "a", "completion": "red"}]
    result = eval_generation(model, tokenizer, records, max_new_tokens=3, batch_size=2)
    assert result["n"] == 2 and [s["reference"] for s in result["samples"]] == ["sat", "red"]
    assert result["score"] == sum(s["correct"] for s in result["samples"]) / 2
    empty = eval_generation(model, tokenizer, [chat("the dog")], max_new_tokens=2)
    assert empty["n"] == 0 and math.isnan(empty["score"])
    with pytest.raises(ValueError, match="one of 'exact', 'contains', 'json'"):
        eval_generation(model, tokenizer, records, match="prefix")


def test_training_turns_a_zero_score_into_one(tmp_path, tokenizer):
    """Held-in sanity check of the whole path: train an adapter on a fixed answer, then it is generated."""
    from deltatune.train.loop import train

    records = [chat(p, "the cat sat on the mat") for p in ("big dog", "small dog", "red log", "blue log")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = make_tiny_llama()
    before = eval_generation(model, tokenizer, records, max_new_tokens=8)
    train(model=model, tokenizer=tokenizer, data={"train": str(tmp_path / "train.jsonl")}, output_dir=str(tmp_path / "run"),
          adapter={"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
          max_steps=40, batch_size=4, optim={"lr": 1e-2}, precision="fp32", log_every=40)
    after = eval_generation(model, tokenizer, records, max_new_tokens=8)
    assert before["score"] == 0.0 and after["score"] == 1.0
    contains = eval_generation(model, tokenizer, [{**records[0], "reference": "on the mat"}], match="contains")
    assert contains["score"] == 1.0
