"""Per-request generation settings and the next-token choice (penalties, greedy, temperature, top-k, nucleus).

Each request samples from its own `torch.Generator` seeded by its `seed`, so a seeded request draws the same
tokens whatever else shares its batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


class RequestError(ValueError):
    """A request that cannot be served as given (a bad setting, a prompt too long, an unknown adapter)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class SamplingParams:
    """max_new_tokens: tokens to generate at most (OpenAI's max_tokens). temperature: 0 = greedy (OpenAI's
    range 0-2). top_p: nucleus sampling, the smallest set of tokens whose probability reaches top_p (Holtzman
    et al. 2019). seed: fixes the sampled tokens; None draws one. stop: strings that end the output (not
    included in it). ignore_eos: keep going past the end-of-sequence token (benchmarks). top_k: sample among
    the k most likely tokens only (0: all). presence_penalty / frequency_penalty (OpenAI's, range -2..2):
    logits of tokens already generated minus presence_penalty, and minus frequency_penalty times their count.
    logprobs: None, or how many most likely alternatives to report with each chosen token's log-probability
    (the model's own distribution, before penalties and temperature). constraint: restricts which tokens may
    come next (deltatune.serve.constrain: JSON schemas); its `allowed(generated ids)` gives them."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    constraint: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_new_tokens!r}", param="max_tokens")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be a number in [0, 2], got {self.temperature!r}", param="temperature")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}", param="top_p")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}", param="seed")
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be up to 4 non-empty strings, got {list(self.stop)!r}", param="stop")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}", param="top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be a number in [-2, 2], got {value!r}", param=name)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise RequestError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}", param="logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        return torch.Generator().manual_seed(seed % (1 << 63))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def choose(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[list[int]] | None = None) -> list[int]:
    """The next token of each row of `logits` (B, vocab), fp32; `histories`: each row's generated tokens so far
    (for penalties and constraints)."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        history = histories[i] if histories is not None else []
        special = p.presence_penalty or p.frequency_penalty or p.constraint is not None
        if p.greedy and not special:
            continue
        row = _processed(logits[i].float(), p, history) if special else logits[i]
        tokens[i] = int(row.argmax()) if p.greedy else _sample(row, p, gen)
    return tokens


def _processed(row: torch.Tensor, params: SamplingParams, history: list[int]) -> torch.Tensor:
    """Penalties (OpenAI's formula) and the constraint's mask applied to one row of logits."""
    row = row.clone()
    if history and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(history, device=row.device).unique(return_counts=True)
        row[ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty
    if params.constraint is not None:
        allowed = params.constraint.allowed(history)
        if allowed is not None:
            masked = torch.full_like(row, float("-inf"))
            masked[allowed] = row[allowed]
            row = masked
    return row


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the k most likely tokens with theirs) under softmax(logits), one row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(k) if k else None
    alternatives = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return float(logp[token]), alternatives


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits.float().cpu()
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= params.top_p] = 0.0  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
