"""Every request field of /v1/completions and /v1/chat/completions: implemented, accepted because it changes
nothing, or refused with 400 naming it (docs/serving.md has the table).

A field that would change the output and is not implemented is refused unless it holds its neutral value
(`echo: false`, `tools: []`, `n: 1` for `best_of`, ...): a client must never get a 200 that silently ignored
what it asked for. Unknown fields are refused too (a misspelled `max_token` would otherwise do nothing).
"""
from __future__ import annotations

from typing import Any

from .sampling import RequestError

BOTH, COMPLETIONS, CHAT = "both", "completions", "chat"

# field -> where it belongs; what it does is the server's (server._params and friends)
IMPLEMENTED = {
    "model": BOTH, "prompt": COMPLETIONS, "messages": CHAT, "max_tokens": BOTH, "max_completion_tokens": CHAT,
    "temperature": BOTH, "top_p": BOTH, "top_k": BOTH, "seed": BOTH, "stop": BOTH, "stream": BOTH,
    "stream_options": BOTH, "n": BOTH, "logprobs": BOTH, "top_logprobs": CHAT, "presence_penalty": BOTH,
    "frequency_penalty": BOTH, "response_format": BOTH, "adapters": BOTH, "ignore_eos": BOTH,
}
# accepted and ignored: they change no token of the output (bookkeeping, routing hints, latency hints)
NO_EFFECT = {"user": BOTH, "metadata": CHAT, "store": CHAT, "service_tier": BOTH, "prediction": CHAT,
             "parallel_tool_calls": CHAT, "safety_identifier": CHAT, "prompt_cache_key": CHAT}
# refused unless they hold one of these neutral values (the value that asks for nothing)
REFUSED_UNLESS = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "modalities": (None, ["text"]), "reasoning_effort": (None,), "web_search_options": (None,),
    "min_tokens": (None, 0), "verbosity": (None,),
}


def check_fields(body: dict[str, Any], *, chat: bool) -> None:
    """Raise RequestError (400, `param` = the field) for the first field this server will not honour."""
    here = CHAT if chat else COMPLETIONS
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    for key, value in body.items():
        where = IMPLEMENTED.get(key) or NO_EFFECT.get(key)
        if where is not None:
            if where not in (BOTH, here):
                raise RequestError(f"{key!r} is not a field of {endpoint}", param=key)
            continue
        if key in REFUSED_UNLESS:
            if any(value == neutral and type(value) is type(neutral) for neutral in REFUSED_UNLESS[key]):
                continue
            raise RequestError(f"{key!r} is not supported by this server (it would change the output); omit it or "
                               f"send {REFUSED_UNLESS[key][-1]!r}", param=key)
        raise RequestError(f"unknown field {key!r} for {endpoint}", param=key)
