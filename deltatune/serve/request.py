"""A request in flight, its result, and what each engine step hands out for it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .sampling import SamplingParams


@dataclass
class Completion:
    """The result of one request. finish_reason: "stop" (end-of-sequence token or a stop string), "length"
    (max_new_tokens) or "abort". Times in seconds from the request's arrival."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None
    adapter: str | None
    first_token_s: float | None
    total_s: float | None


class Request:
    """One generation in flight. `slot` is its row in the running batch and the KV cache (None: not running)."""

    def __init__(self, request_id: str, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> None:
        self.id, self.prompt_ids, self.adapter, self.params = request_id, prompt_ids, adapter, params
        self.generator = params.generator()
        self.output_ids: list[int] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []  # (token, its logprob, top-k) per token
        self.text = ""  # decoded output, cut at a stop string
        self.sent = 0  # characters of `text` already handed out as deltas
        self.slot: int | None = None
        self.virtual = 0  # virtual tokens (prompt tuning) before the prompt
        self.length = 0  # tokens whose K/V are in the cache (virtual ones included)
        self.finish_reason: str | None = None
        self.stopped_by_eos = False  # the last output token is the end-of-sequence token (not in the text)
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def prefilling(self) -> bool:
        """Running, its prompt not all in the cache yet (chunked prefill)."""
        return self.slot is not None and self.length < self.virtual + len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self) -> Completion:
        since = lambda t: None if t is None else t - self.arrival  # noqa: E731
        return Completion(self.text, list(self.output_ids), len(self.prompt_ids), self.finish_reason, self.adapter,
                          since(self.first_token_at), since(self.finished_at))


@dataclass
class StepOutput:
    request: Request
    token_ids: list[int]  # tokens generated in this step
    text: str  # new text safe to show (held back while it could still become a stop string)
    finished: bool
    logprobs: list = field(default_factory=list)  # this step's (token, logprob, top) entries, if asked for


def new_text(request: Request, tokenizer: Any) -> str:
    """Decode the output so far, end it at a stop string, and return the part not handed out yet."""
    if tokenizer is None:
        return ""
    ids = request.output_ids[:-1] if request.finish_reason == "stop" else request.output_ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in request.params.stop) if i >= 0]
    if hits:
        text, request.finish_reason = text[: min(hits)], "stop"
    request.text = text
    safe = len(text)
    if not request.finished:  # a partial character, or the start of a stop string, may still change
        safe -= max((len(s) - 1 for s in request.params.stop), default=0)
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
    piece = text[request.sent: max(safe, request.sent)]
    request.sent += len(piece)
    return piece
