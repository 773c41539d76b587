"""Chat conversations to token ids with loss only on the assistant's tokens.

The model's own chat template renders the conversation, so training sees exactly the text that inference
(`apply_chat_template(..., add_generation_prompt=True)`) will produce. Which tokens belong to an assistant
turn is found by rendering prefixes rather than by parsing the template's markers, so that it works for any
template:

    P_i = ids(render(messages[:i], add_generation_prompt=True))   # ... <|im_start|>assistant\n
    F_i = ids(render(messages[:i + 1]))                             # ... <|im_start|>assistant\nHi<|im_end|>\n
    assistant tokens of turn i = F_i[len(P_i):]                     #                         Hi<|im_end|>\n

then trimmed after the last special token (the end-of-turn marker, e.g. <|im_end|>, <|eot_id|>,
<end_of_turn>): the model must learn to emit the marker, while the newline a template writes after it is
formatting that the next turn's prompt supplies. Both P_i and F_i must be token prefixes of the whole
conversation; a template that rewrites earlier turns (some drop past reasoning) breaks this and is
reported rather than silently mislabelled.
"""
from __future__ import annotations

from typing import Any, Sequence

from .records import DataError

IGNORE_INDEX = -100  # the label torch's cross_entropy skips


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, source: str) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"{source}: format 'messages' needs a tokenizer with a chat template, and the tokenizer of {name} has "
            "none (a base model?). Use data.format prompt_completion or text, or set tokenizer.chat_template "
            "to a Jinja template before training"
        )


def _ids(tokenizer: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool, location: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception("roles must alternate")
        raise DataError(f"{location}: the tokenizer's chat template failed on {len(messages)} messages: {exc}") from None
    # add_special_tokens=False: templates write their own BOS (Llama 3's {{ bos_token }}); adding it again
    # would double it. This is what apply_chat_template(tokenize=True) does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token, named (eos, pad) or added as special (<|im_end|>, <|eot_id|>)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)


def _trim_after_end_marker(segment: list[int], specials: frozenset[int]) -> list[int]:
    for end in range(len(segment) - 1, -1, -1):
        if segment[end] in specials:
            return segment[: end + 1]
    return segment  # a template without an end marker: the whole rendered turn is the target


def chat_example(
    messages: Sequence[dict[str, Any]], tokenizer: Any, location: str, specials: frozenset[int] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE_INDEX except on assistant turns."""
    specials = special_ids(tokenizer) if specials is None else specials
    full = _ids(tokenizer, messages, False, location)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:i], True, location)
        through = full if i == len(messages) - 1 else _ids(tokenizer, messages[: i + 1], False, location)
        for name, part in (("the prompt before", prompt), ("the conversation through", through)):
            if full[: len(part)] != part:
                raise DataError(
                    f"{location}: the chat template does not render {name} messages[{i}] as a prefix of the "
                    "whole conversation, so the assistant tokens cannot be located (the template rewrites "
                    "earlier turns). Use data.format prompt_completion, or a template that renders turns "
                    "independently"
                )
        start = len(prompt)
        target = _trim_after_end_marker(through[start:], specials)
        labels[start : start + len(target)] = target
    return full, labels
