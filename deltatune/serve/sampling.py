"""Per-request generation settings and the next-token choice (greedy, temperature, nucleus).

Each request samples from its own `torch.Generator` seeded by its `seed`, so a seeded request draws the same
tokens whatever else shares its batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

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
    included in it). ignore_eos: keep going past the end-of-sequence token (benchmarks)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.getrandbits(63)
        return torch.Generator().manual_seed(seed % (1 << 63))


def choose(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """The next token of each row of `logits` (B, vocab), fp32."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[i] = _sample(logits[i], p, gen)
    return tokens


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= params.top_p] = 0.0  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
