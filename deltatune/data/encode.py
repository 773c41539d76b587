"""Records to token ids and labels, one `Example` per training row.

Labels follow the transformers convention: aligned with input_ids (the loss shifts them), IGNORE_INDEX
(-100) where a token carries no loss. What carries loss depends on the format:

    messages           the assistant turns (content + end-of-turn token), see `chat.py`
    prompt_completion  the completion; rendered as a user/assistant chat when the tokenizer has a chat
                       template (so the adapter answers in the same format at inference), else
                       prompt + completion + eos
    text               every token; text + eos, cut into max_length chunks (continued pretraining loses
                       nothing to truncation)

An example longer than max_length is cut to its first max_length tokens (`overlong: truncate`) or dropped
(`overlong: skip`); a record far longer than that is cut by characters before it is tokenized at all
(`_encode_bounded`), so one huge record costs no more than a long one. An example left with no loss token
(a conversation with no assistant turn, or one whose answer was truncated away) is dropped, since it would
add nothing but padding. `TokenizeReport` counts all three so a run can say what it did to the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence, TypedDict

from .chat import IGNORE_INDEX, chat_example, has_chat_template, require_chat_template, special_ids
from .records import DataError, check_records, detect_format, where


class _ExampleBase(TypedDict):
    input_ids: list[int]
    labels: list[int]


class Example(_ExampleBase, total=False):
    position_ids: list[int]  # only on packed rows: restarts at 0 for each example packed into the row


@dataclass
class TokenizeReport:
    """What `tokenize` did; `summary()` is the one line a training run logs."""

    source: str
    format: str
    max_length: int
    records: int = 0  # records read
    examples: int = 0  # examples kept (text: chunks)
    truncated: int = 0  # cut to max_length
    skipped: int = 0  # over max_length with overlong=skip
    dropped: int = 0  # no token with a loss
    chunked: int = 0  # texts split into several chunks
    tokens: int = 0  # tokens in kept examples
    loss_tokens: int = 0  # of which carry a loss

    def summary(self) -> str:
        line = (f"{self.source}: {self.examples:,} examples ({self.format}) from {self.records:,} records, "
                f"{self.tokens:,} tokens ({self.loss_tokens:,} with loss)")
        notes = []
        if self.truncated:
            notes.append(f"{self.truncated:,} truncated to {self.max_length} tokens")
        if self.skipped:
            notes.append(f"{self.skipped:,} skipped as longer than {self.max_length} tokens")
        if self.chunked:
            notes.append(f"{self.chunked:,} texts split into {self.max_length}-token chunks")
        if self.dropped:
            notes.append(f"{self.dropped:,} dropped with no loss tokens")
        return line + ("; " + ", ".join(notes) if notes else "")


def tokenize(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto",
    max_length: int = 512,
    overlong: Literal["truncate", "skip"] = "truncate",
    source: str | None = None,
) -> tuple[list[Example], TokenizeReport]:
    """Examples for `records` in order, and the report. `source` names the data in messages (default: the file)."""
    source = source or getattr(records, "source", None) or "data"
    if max_length < 2:
        raise DataError(f"data.max_length must be at least 2 tokens, got {max_length}")
    if overlong not in ("truncate", "skip"):
        raise DataError(f"data.overlong must be 'truncate' or 'skip', got {overlong!r}")
    if format == "auto":
        format = detect_format(records, source)
    else:
        check_records(records, format, source)
    if format == "messages":
        require_chat_template(tokenizer, source)
    report = TokenizeReport(source=source, format=format, max_length=max_length, records=len(records))
    examples: list[Example] = []
    specials = special_ids(tokenizer)
    use_chat = has_chat_template(tokenizer)
    budget = _char_budget(tokenizer, max_length)
    for index, record in enumerate(records):
        location = where(records, index, source)
        if format == "text":
            pieces = _text_chunks(record["text"], tokenizer, max_length)
            report.chunked += len(pieces) > 1
        else:
            ids, labels = _encode_bounded(record, format, tokenizer, location, specials, use_chat, budget, max_length)
            if len(ids) > max_length:
                if overlong == "skip":
                    report.skipped += 1
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
                report.truncated += 1
            pieces = [(ids, labels)]
        for ids, labels in pieces:
            # labels[0] is never a target (nothing precedes it), so an example needs a loss token after it
            if all(label == IGNORE_INDEX for label in labels[1:]):
                report.dropped += 1
                continue
            examples.append(Example(input_ids=ids, labels=labels))
            report.tokens += len(ids)
            report.loss_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
    report.examples = len(examples)
    if not examples:
        raise DataError(f"{source}: no example left to train on ({report.summary()})")
    return examples, report


def _encode(record: dict[str, Any], format: str, tokenizer: Any, location: str, specials: frozenset[int],
            use_chat: bool) -> tuple[list[int], list[int]]:
    if format == "messages":
        return chat_example(record["messages"], tokenizer, location, specials)
    if use_chat:
        turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        return chat_example(turns, tokenizer, location, specials)
    return _raw_prompt_completion(record["prompt"], record["completion"], tokenizer)


def _encode_bounded(record: dict[str, Any], format: str, tokenizer: Any, location: str, specials: frozenset[int],
                    use_chat: bool, budget: int | None, max_length: int) -> tuple[list[int], list[int]]:
    """`_encode`, but a record of more than `budget` characters is first cut to `budget` characters.

    A token covers at most `longest` characters, so the cut text still yields more than max_length + margin
    tokens, and everything after the cut would be truncated (or the record skipped) anyway: a 50 MB record
    costs a few thousand tokens, not minutes and gigabytes. Whether the cut text really yields that many is
    checked (a tokenizer whose unknown-word token spans a whole word can break the bound); if not, the whole
    record is encoded.
    """
    if budget is not None:
        cut = _cut_record(record, format, budget)
        if cut is not None:
            ids, labels = _encode(cut, format, tokenizer, location, specials, use_chat)
            if len(ids) > max_length + _MARGIN:
                return ids, labels
    return _encode(record, format, tokenizer, location, specials, use_chat)


_MARGIN = 64  # tokens past max_length that a cut record must still yield (the cut can change tokens near it)


def _char_budget(tokenizer: Any, max_length: int) -> int | None:
    """Characters that surely tokenize to more than max_length + _MARGIN tokens: that many tokens of the longest."""
    try:
        longest = max(len(token) for token in tokenizer.get_vocab())
    except (AttributeError, TypeError, ValueError):  # no vocabulary to read: no shortcut
        return None
    return (max_length + _MARGIN) * max(longest, 1)


def _cut_record(record: dict[str, Any], format: str, budget: int) -> dict[str, Any] | None:
    """The record with its text cut after `budget` characters in reading order (later turns dropped), or None
    if it is not that long."""
    if format == "messages":
        turns, used = [], 0
        for message in record["messages"]:
            content = message["content"]
            if used + len(content) > budget:
                turns.append({**message, "content": content[: budget - used]})
                return {**record, "messages": turns}
            turns.append(message)
            used += len(content)
        return None
    prompt, completion = record["prompt"], record["completion"]
    if len(prompt) + len(completion) <= budget:
        return None
    if len(prompt) > budget:
        return {**record, "prompt": prompt[:budget], "completion": ""}
    return {**record, "completion": completion[: budget - len(prompt)]}


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else []  # no eos token: documents simply run on


_TEXT_SLICE = 1_000_000  # characters tokenized at a time: a tokenizer's per-token bookkeeping of a 50 MB text is gigabytes


def _text_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens; a long text in slices cut before whitespace."""
    ids, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= _TEXT_SLICE else start + _TEXT_SLICE
        if end < len(text):
            space = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = space if space > start else end  # the space opens the next slice, as BPE attaches it to the next word
        ids += tokenizer(text[start:end], add_special_tokens=start == 0)["input_ids"]
        start = end
    return ids


def _text_chunks(text: str, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    ids = _text_ids(text, tokenizer) + _eos(tokenizer)
    return [(ids[i : i + max_length], ids[i : i + max_length]) for i in range(0, len(ids), max_length)]


def _raw_prompt_completion(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    # Tokenized apart so the boundary is exact; the prompt gets the tokenizer's BOS (if it adds one).
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + _eos(tokenizer)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
