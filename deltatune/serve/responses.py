"""OpenAI's response and chunk objects (completions and chat), with n choices and logprobs."""
from __future__ import annotations

import json
import time
from typing import Any

from .sampling import RequestError


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def logprobs_wanted(body: dict, chat: bool) -> int | None:
    """None (no logprobs) or the number of alternatives per token: completions' `logprobs: k`; chat's
    `logprobs: true` with `top_logprobs: k` (0 when omitted)."""
    if not chat:
        value = body.get("logprobs")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RequestError(f"logprobs must be an integer (alternatives per token), got {value!r}", param="logprobs")
        return value
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise RequestError(f"logprobs must be true or false, got {wanted!r}", param="logprobs")
    if top is not None and not wanted:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise RequestError(f"top_logprobs must be an integer in [0, 20], got {top!r}", param="top_logprobs")
    return (top or 0) if wanted else None


class Shape:
    """The objects of one request of n choices; `index` maps each engine request id to its choice."""

    def __init__(self, request_id: str, model: str, chat: bool, prompt_tokens: int, tokenizer: Any,
                 index: dict[str, int]) -> None:
        self.id, self.model, self.chat, self.prompt_tokens = request_id, model, chat, prompt_tokens
        self.tokenizer, self.index = tokenizer, index
        self.created = int(time.time())

    def usage(self, requests: list) -> dict:
        n = sum(len(r.output_ids) for r in requests)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, requests: list) -> dict:
        choices = []
        for i, request in enumerate(requests):
            reason = _reason(request.finish_reason)
            choice = {"index": i, "message": {"role": "assistant", "content": request.text}} if self.chat else \
                {"index": i, "text": request.text}
            choices.append({**choice, "logprobs": self.logprobs(request), "finish_reason": reason})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage(requests)}

    def chunk(self, index: int, piece: Any, reason: str | None, logprobs: dict | None = None) -> dict:
        reason = None if reason is None else _reason(reason)
        if self.chat:
            delta = piece if piece is not None else {}
            return {**self._head("chat.completion.chunk"),
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        return {**self._head("text_completion"),
                "choices": [{"index": index, "text": piece or "", "logprobs": logprobs, "finish_reason": reason}]}

    def logprobs(self, request, step: list | None = None) -> dict | None:
        """The logprobs object of `request` (all its tokens, or one step's entries); None if not asked for.
        The end-of-sequence token that stopped a request is not part of its text, nor of these."""
        if request.params.logprobs is None:
            return None
        entries = request.logprobs if step is None else step
        if request.stopped_by_eos and entries and entries[-1] is request.logprobs[-1] and \
                (step is None or request.finished):
            entries = entries[:-1]
        text = lambda t: self.tokenizer.decode([t]) if self.tokenizer is not None else str(t)  # noqa: E731
        if self.chat:
            item = lambda t, lp: {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())}  # noqa: E731
            return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]}
                                for t, lp, top in entries]}
        offsets, at = [], 0
        for t, _, _ in entries:
            offsets.append(at)
            at += len(text(t))
        return {"tokens": [text(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [_by_text(top, text) for _, _, top in entries], "text_offset": offsets}


def _by_text(top: list[tuple[int, float]], text) -> dict[str, float]:
    """Completions' {token text: logprob}; tokens of the same text (partial UTF-8) keep the likeliest."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(text(token), logprob)
    return out


def _reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"
