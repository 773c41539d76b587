"""deltatune.data: loading, format checks, label masks, packing isolation (parity with unpacked runs), order."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune.data import (
    IGNORE_INDEX, DataError, batch_order, collate, detect_format, load_records, pack, split_eval, tokenize,
)

from conftest import make_tiny_llama

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "Sure."},
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level tokenizer: one token per byte (ids 0-255) plus three ChatML specials; decodes exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({s: 256 + i for i, s in enumerate(specials)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (a base model's)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _labelled(tok, example):
    return tok.decode([label for label in example["labels"] if label != IGNORE_INDEX])


# ---- files -----------------------------------------------------------------------------------------------


def test_load_jsonl_json_and_data_key(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    records = load_records(path)
    assert records == rows
    assert records.locations == [f"{path}:1", f"{path}:3"]  # blank line skipped, line numbers kept
    (tmp_path / "l.json").write_text(json.dumps(rows))
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    assert load_records(tmp_path / "l.json") == rows == load_records(str(tmp_path / "d.json"))


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    assert load_records(tmp_path / "t.parquet") == rows


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "oops",}\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        load_records(path)


def test_empty_missing_and_non_object(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no examples"):
        load_records(tmp_path / "e.jsonl")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DataError, match="has no examples"):
        load_records(tmp_path / "e.json")
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    _write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}, ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"n.jsonl:2: a record must be a JSON object"):
        load_records(tmp_path / "n.jsonl")
    (tmp_path / "x.csv").write_text("text\n")
    with pytest.raises(DataError, match="unknown data file type '.csv'"):
        load_records(tmp_path / "x.csv")


def test_detect_format_and_missing_key(tmp_path):
    assert detect_format([{"messages": CHAT}]) == "messages"
    assert detect_format([{"prompt": "p", "completion": "c"}]) == "prompt_completion"
    assert detect_format([{"text": "t", "id": 3}]) == "text"
    path = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p2"}])
    with pytest.raises(DataError, match=rf"{path}:2: missing key 'completion'"):
        detect_format(load_records(path))
    with pytest.raises(DataError, match="record 0: cannot tell the data format"):
        detect_format([{"question": "q"}])
    with pytest.raises(DataError, match=r"messages\[1\]\['content'\] must be a string"):
        detect_format([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}])


# ---- tokenize ---------------------------------------------------------------------------------------------


def test_messages_loss_only_on_assistant_turns(tokenizer):
    (example,), report = tokenize([{"messages": CHAT}], tokenizer, format="messages", max_length=512, overlong="truncate")
    assert example["input_ids"] == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False))["input_ids"]
    assert _labelled(tokenizer, example) == "Hello there<|im_end|>Sure.<|im_end|>"
    # the labelled tokens are exactly where they sit in the input (no shift, no stray newline)
    masked = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert all(example["labels"][i] == example["input_ids"][i] for i in masked)
    assert report.loss_tokens == len(masked) == len("Hello there") + len("Sure.") + 2
    assert report.examples == 1 and report.format == "messages"


def test_no_chat_template_is_a_clear_error(plain_tokenizer):
    with pytest.raises(DataError, match="needs a tokenizer with a chat template.*prompt_completion or text"):
        tokenize([{"messages": CHAT}], plain_tokenizer, format="auto", max_length=64, overlong="truncate")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ messages | length }}" + CHATML  # every render starts differently
    with pytest.raises(DataError, match=r"record 0: .*not render .*messages\[2\] as a prefix"):
        tokenize([{"messages": CHAT}], tok, format="messages", max_length=512, overlong="truncate")


def test_prompt_completion_chat_and_raw(tokenizer, plain_tokenizer):
    record = {"prompt": "2+2=", "completion": "4"}
    (chat,), _ = tokenize([record], tokenizer, format="auto", max_length=64, overlong="truncate")
    assert tokenizer.decode(chat["input_ids"]) == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert _labelled(tokenizer, chat) == "4<|im_end|>"
    (raw,), _ = tokenize([record], plain_tokenizer, format="prompt_completion", max_length=64, overlong="truncate")
    assert plain_tokenizer.decode(raw["input_ids"]) == "2+2=4<|im_end|>"
    assert raw["labels"] == [IGNORE_INDEX] * 4 + raw["input_ids"][4:]


def test_text_is_chunked_not_truncated(tokenizer):
    text = "abcdefghij" * 5  # 50 tokens + eos = 51
    examples, report = tokenize([{"text": text}, {"text": "short"}], tokenizer, format="text", max_length=16, overlong="truncate")
    lengths = [len(e["input_ids"]) for e in examples]
    assert lengths == [16, 16, 16, 3, 6]
    assert all(e["labels"] == e["input_ids"] for e in examples)
    assert tokenizer.decode(sum((e["input_ids"] for e in examples[:4]), [])) == text + "<|im_end|>"
    assert report.chunked == 1 and report.truncated == 0 and report.examples == 5


def test_truncate_vs_skip_and_dropped_counts(tokenizer):
    long_answer = {"prompt": "q", "completion": "x" * 40}
    answer_cut_away = {"prompt": "q" * 40, "completion": "x"}
    short = {"prompt": "q", "completion": "a"}
    records = [long_answer, answer_cut_away, short]
    kept, report = tokenize(records, tokenizer, format="prompt_completion", max_length=32, overlong="truncate")
    assert (report.truncated, report.skipped, report.dropped, report.examples) == (2, 0, 1, 2)
    assert len(kept[0]["input_ids"]) == 32 and _labelled(tokenizer, kept[0]) == "x" * 12  # 32 - 20 prompt tokens
    kept, report = tokenize(records, tokenizer, format="prompt_completion", max_length=32, overlong="skip")
    assert (report.truncated, report.skipped, report.dropped, report.examples) == (0, 2, 0, 1)
    assert "2 skipped as longer than 32 tokens" in report.summary()
    no_assistant = {"messages": [{"role": "user", "content": "hello?"}]}
    with pytest.raises(DataError, match="no example left"):
        tokenize([no_assistant], tokenizer, format="messages", max_length=32, overlong="skip")


# ---- packing and collate ----------------------------------------------------------------------------------


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (n,), generator=g).tolist(),
             "labels": torch.randint(0, 256, (n,), generator=g).tolist()} for n in lengths]


def test_pack_fills_rows_and_restarts_positions():
    examples = _examples([9, 7, 5, 4, 3, 2, 2, 1])
    rows = pack(examples, 12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 33 and len(rows) == 3  # ceil(33 / 12): no row wasted
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)  # no loss across an example boundary
        pieces = [row["input_ids"][a:b] for a, b in zip(starts, starts[1:] + [len(row["input_ids"])])]
        for piece in pieces:
            assert any(piece == e["input_ids"] for e in examples)
    with pytest.raises(DataError, match="more than the packing row length"):
        pack(_examples([20]), 12)


def test_collate_pads_right():
    batch = collate(_examples([3, 5]), pad_id=7)
    assert batch["input_ids"].shape == (2, 5) and "position_ids" not in batch
    assert batch["input_ids"][0, 3:].tolist() == [7, 7] and batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    packed = collate(pack(_examples([3, 2]), 8) + pack(_examples([6]), 8), pad_id=7)
    assert "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("block_mask", [False, True])
def test_packed_row_logits_equal_unpacked(attn, block_mask):
    """Two examples packed in one row (plus a padded row) give the logits each gives alone."""
    model = make_tiny_llama()
    model.config._attn_implementation = attn
    examples = _examples([7, 5, 4])
    rows = pack(examples, 12)  # [7 + 5], [4]
    batch = collate(rows, pad_id=0, block_mask=block_mask)
    assert batch["input_ids"].shape == (2, 12)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Without the explicit mask, use_cache=False is required: with a KV cache transformers skips its
    # packed-sequence detection (see deltatune/data/packing.py). The explicit mask works either way.
    options = {} if block_mask else {"use_cache": False}
    with torch.no_grad():
        packed = model(**inputs, **options).logits
        alone = [model(torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    torch.testing.assert_close(packed[0, :7], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 7:], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, :4], alone[2], atol=1e-5, rtol=0)


# ---- order and split --------------------------------------------------------------------------------------


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_batch_order_is_deterministic_and_grouping_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1000,), generator=g).tolist()
    for group in (False, True):
        order = batch_order(lengths, 8, group_by_length=group, seed=3, epoch=1)
        assert order == batch_order(lengths, 8, group_by_length=group, seed=3, epoch=1)
        assert order != batch_order(lengths, 8, group_by_length=group, seed=3, epoch=2)
        assert sorted(i for b in order for i in b) == list(range(1000))
        assert all(len(b) == 8 for b in order)
    grouped = batch_order(lengths, 8, group_by_length=True, seed=3, epoch=1)
    plain = batch_order(lengths, 8, group_by_length=False, seed=3, epoch=1)
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)


def test_split_eval():
    items = list(range(100))
    train, held = split_eval(items, 0.1, seed=0)
    assert len(held) == 10 and sorted(train + held) == items
    assert (train, held) == split_eval(items, 0.1, seed=0) and held != split_eval(items, 0.1, seed=1)[1]
    assert split_eval(items, 0.0, seed=0) == (items, [])
    assert len(split_eval([1, 2], 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError, match="eval_fraction"):
        split_eval(items, 1.0, seed=0)


def test_split_keeps_file_lines_for_errors(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"text": str(i)} for i in range(9)] + [{"txt": "typo"}])
    train, held = split_eval(load_records(path), 0.5, seed=0)
    bad = train if {"txt": "typo"} in train else held
    with pytest.raises(DataError, match=rf"{path}:10: missing key 'text'"):
        tokenize(bad, None, format="text", max_length=8, overlong="truncate")


@pytest.mark.e2e
def test_smollm2_template_masks_exactly_the_answers():
    """The embedded model's real template (it injects a default system prompt) labels only the answers."""
    from transformers import AutoTokenizer

    from deltatune.models import ensure_embedded_model

    tok = AutoTokenizer.from_pretrained(ensure_embedded_model())
    chat = CHAT[1:]  # no system message: the template writes its own
    (example,), _ = tokenize([{"messages": chat}], tok, format="messages", max_length=512, overlong="truncate")
    assert example["input_ids"] == tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    assert _labelled(tok, example) == "Hello there<|im_end|>Sure.<|im_end|>"
