"""LoRAHub (deltatune.compose.lorahub): the composed adapter, the objective, reproducible search, refusals."""
import sys

import pytest
import torch

import deltatune as dt
from deltatune.compose import CombineError, combine_adapters
from deltatune.compose.lorahub import lorahub
from deltatune.data import tokenize
from deltatune.train.evaluate import eval_loss

from conftest import assert_unchanged, capture_state, make_tiny_llama

pytest.importorskip("nevergrad")

WORDS = "the a cat dog sat ran on under mat log red blue big small and then".split()
SPECIALS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return tok


EXAMPLES = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("the cat sat", "on the mat"), ("a dog ran", "under the log"), ("big red cat", "then sat"),
                         ("small blue dog", "ran on"), ("the log", "and the mat")]]


def _model():
    model = make_tiny_llama()
    for i, n in enumerate(("t1", "t2", "t3")):
        torch.manual_seed(40 + i)
        dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                  n, activate=False)
    return model


def _objective(model, tokenizer, weights, l1=0.05):
    probe = _model()
    combine_adapters(probe, ["t1", "t2", "t3"], weights, "probe", combination_type="lorahub", activate=True)
    rows, _ = tokenize(EXAMPLES, tokenizer, max_length=64)
    loss = eval_loss(probe, tokenizer, rows, batch_size=len(rows))["loss"]
    return loss + l1 * sum(abs(w) for w in weights) / len(weights)


def test_result_is_the_lorahub_combination_of_the_best_weights(tokenizer):
    model = _model()
    result = lorahub(model, ["t1", "t2", "t3"], EXAMPLES, "hub", tokenizer=tokenizer, budget=12, seeds=[0, 1])
    assert dt.active_adapters(model) == ["hub"] and len(result.runs) == 2
    assert all(abs(w) <= 1.5 for w in result.weights)
    assert result.objective == min(r["objective"] for r in result.runs)
    assert result.objective == pytest.approx(_objective(model, tokenizer, result.weights), abs=1e-5)
    reference = _model()
    combine_adapters(reference, ["t1", "t2", "t3"], result.weights, "hub", combination_type="lorahub")
    ours, theirs = dt.adapter_tensors(model, "hub"), dt.adapter_tensors(reference, "hub")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_search_is_reproducible_per_seed_and_no_worse_than_the_start(tokenizer):
    runs = [lorahub(_model(), ["t1", "t2", "t3"], EXAMPLES, "hub", tokenizer=tokenizer, budget=15, seeds=[3])
            for _ in range(2)]
    assert runs[0].weights == runs[1].weights
    other = lorahub(_model(), ["t1", "t2", "t3"], EXAMPLES, "hub", tokenizer=tokenizer, budget=15, seeds=[0])
    assert other.weights != runs[0].weights  # seeds other than 0 start elsewhere (NGOpt is deterministic here)
    start = _objective(_model(), tokenizer, [0.0, 0.0, 0.0])
    assert other.objective <= start + 1e-6


def test_saved_result_loads_as_plain_lora(tokenizer, tmp_path):
    model = _model()
    lorahub(model, ["t1", "t2", "t3"], EXAMPLES, "hub", tokenizer=tokenizer, budget=4)
    dt.save_adapter(model, tmp_path / "hub", "hub")
    config = dt.read_adapter(tmp_path / "hub")[0]
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 4, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0), "budget"), (dict(seeds=[]), "seeds"), (dict(l1=-1.0), "l1"), (dict(bound=0), "bound"),
])
def test_bad_settings_are_refused_before_anything_changes(tokenizer, kwargs, match):
    model = _model()
    before = capture_state(model)
    with pytest.raises(CombineError, match=match):
        lorahub(model, ["t1", "t2"], EXAMPLES, "hub", tokenizer=tokenizer, **kwargs)
    with pytest.raises(CombineError, match="few-shot"):
        lorahub(model, ["t1", "t2"], [], "hub", tokenizer=tokenizer)
    assert_unchanged(model, before)


def test_different_ranks_are_refused_and_nevergrad_missing_is_named(tokenizer, monkeypatch):
    model = _model()
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), "r2", activate=False)
    with pytest.raises(CombineError, match="one rank r"):
        lorahub(model, ["t1", "r2"], EXAMPLES, "hub", tokenizer=tokenizer, budget=2)
    assert "hub" not in dt.adapters(model)
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    with pytest.raises(ImportError, match="pip install nevergrad"):
        lorahub(model, ["t1", "t2"], EXAMPLES, "hub", tokenizer=tokenizer)
