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
(`overlong: skip`); an example left with no loss token (a conversation with no assistant turn, or one whose
answer was truncated away) is dropped, since it would add nothing but padding. `TokenizeReport` counts all
three so a run can say what it did to the data.
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
    for index, record in enumerate(records):
        location = where(records, index, source)
        if format == "text":
            pieces = _text_chunks(record["text"], tokenizer, max_length)
            report.chunked += len(pieces) > 1
        else:
            if format == "messages":
                ids, labels = chat_example(record["messages"], tokenizer, location, specials)
            elif use_chat:
                turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
                ids, labels = chat_example(turns, tokenizer, location, specials)
            else:
                ids, labels = _raw_prompt_completion(record["prompt"], record["completion"], tokenizer)
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


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else []  # no eos token: documents simply run on


def _text_chunks(text: str, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    ids = list(tokenizer(text)["input_ids"]) + _eos(tokenizer)
    return [(ids[i : i + max_length], ids[i : i + max_length]) for i in range(0, len(ids), max_length)]


def _raw_prompt_completion(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    # Tokenized apart so the boundary is exact; the prompt gets the tokenizer's BOS (if it adds one).
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + _eos(tokenizer)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
