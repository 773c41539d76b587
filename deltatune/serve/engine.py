"""The serving engine: continuous batching of requests for many adapters over one base model.

    engine = Engine(model, tokenizer)
    outs = engine.generate(["Hi", "Hello"], adapters=["support", None], max_new_tokens=32)   # offline batch

    req = engine.add_request("Hi", adapter="support", params=SamplingParams(max_new_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...                                                        # step API

Every `step()` admits waiting requests into the running batch, prefills them together (one padded forward),
then decodes one token for every running request (one forward); finished requests leave at once. Rows of
one forward belong to different adapters, or to the base model (adapter None): the model runs under
`deltatune.route`, so each site applies each adapter's delta, unmerged, to that adapter's rows only.

The forward is the model's own modules driven by the engine (embeddings, each decoder layer with the
engine's slot KV cache and mask, final norm, head), so every site inside a decoder layer (LoRA, DoRA, IA3 on
linear layers; bottleneck adapters on an MLP or attention block) serves as it trains. Llama, Mistral (with or
without its sliding window), Qwen2, Qwen3 and Gemma 1 are served (their decoder layers take
`position_embeddings`, `attention_mask` and the cache; sliding-window layers get a windowed mask); anything
else is refused by name. Greedy decoding in fp32 gives each request the tokens it gets alone.

Precision: the engine computes in the model's own dtype (an fp32 model, or one loaded in bf16 as `deltatune
serve` does), or with `autocast=torch.bfloat16` under autocast over the weights as they are: the computation
`deltatune eval` and training run, so an evaluation through the engine computes what `generate()` computes
under the same autocast (up to the order of the bf16 sums). The KV cache keeps what the attention produces.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from typing import Any, Sequence

import torch
from torch import nn

from ..core.model import adapters as attached_adapters
from ..core.model import route
from .families import (SUPPORTED_MODEL_TYPES, _additive_mask, _BYPASSED, cache_kwarg, check_servable,  # noqa: F401
                       final_logit_softcap, sliding_windows)
from .fused_lora import FusedLora
from .kv import SlotKVCache
from .prefix import AdapterVersions, PrefixCache, PrefixReuse
from .request import Completion, Request, StepOutput, new_text
from .sampling import RequestError, SamplingParams, choose, top_logprobs
from .servable import AdapterSpec, ServableAdapters, _adds_positions, _is_prompt  # noqa: F401

Prompt = str | Sequence[int]


class Engine(ServableAdapters, PrefixReuse):
    """Continuous batching over one base model with per-row adapters (see the module docstring).

    max_batch_size: running requests at most; more wait in a queue. max_model_len: prompt plus new tokens at
    most (default: the model's max_position_embeddings). max_prefill_tokens: padded prompt tokens admitted per
    step, which bounds how long one step stalls the running requests. `blend` turns a {name: weight} adapter
    spec into an attached adapter (deltatune.serve.registry.AdapterRegistry.blend; by default
    `blend_lora` with a cache). fused_lora: run plain LoRA adapters as one stacked product per site
    (deltatune.serve.fused_lora) instead of the core's one product per adapter. autocast: run every forward
    under `torch.autocast` to this dtype (bf16 where the hardware computes it natively), weights untouched.
    prefix_cache_bytes: memory bound of the prefix cache (deltatune.serve.prefix; 0: no prefix caching).
    prefill_chunk: prompt tokens of one request prefilled per step at most (chunked prefill: a long prompt no
    longer stalls the running requests for its whole prefill; None: whole prompts).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, max_batch_size: int = 64,
                 max_model_len: int | None = None, max_prefill_tokens: int = 4096, blend=None,
                 fused_lora: bool = True, autocast: torch.dtype | None = None,
                 prefix_cache_bytes: int = 256 << 20, prefill_chunk: int | None = 512) -> None:
        check_servable(model)
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be >= 1")
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        limit = config.max_position_embeddings
        self.max_model_len = min(max_model_len or limit, limit)
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.autocast = autocast
        self.cache = SlotKVCache(config.num_hidden_layers)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i].slot == i
        self._lock = threading.Lock()  # add_request/abort may come from other threads than step()
        self._aborts: set[str] = set()
        self._ids = itertools.count()
        self._checked: dict[str, object] = {}  # adapter name -> the Adapter object found servable
        self._blend = blend
        self._eval_for: set[tuple] = set()  # (model, its adapters) seen in eval mode
        self.fused = FusedLora(model, dtype=autocast) if fused_lora else _Unfused()
        self._blends: dict[tuple, str] = {}
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self._versions = AdapterVersions()

    # ---- requests ------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt as the tokenizer makes them by default (a BOS where it adds one); a chat
        template's text passes add_special_tokens=False, since the template wrote its own."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; give Engine(model, tokenizer) or token ids")
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        return [int(t) for t in prompt]

    def add_request(self, prompt: Prompt, adapter: AdapterSpec = None, params: SamplingParams | None = None,
                    request_id: str | None = None, label: str | None = None) -> Request:
        """Queue a request; it joins the running batch at the next step. Raises RequestError if it cannot run
        (`label`: the adapter's name in those errors, where the client knows it by another)."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        if len(ids) + params.max_new_tokens > self.max_model_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} tokens "
                f"and max_tokens asks for {params.max_new_tokens} more. Shorten the prompt or lower max_tokens",
                param="max_tokens" if len(ids) < self.max_model_len else "prompt", code="context_length_exceeded")
        name = self.resolve_adapter(adapter, label)
        request = Request(request_id or f"req-{next(self._ids)}", ids, name, params)
        request.virtual = self.virtual_length(name)
        if request.virtual and len(ids) + request.virtual + params.max_new_tokens > self.max_model_len:
            raise RequestError(f"this model's maximum context length is {self.max_model_len} tokens; adapter "
                               f"{label or adapter!r} adds {request.virtual} virtual tokens to the prompt's {len(ids)} and "
                               f"max_tokens asks for {params.max_new_tokens} more", param="max_tokens",
                               code="context_length_exceeded")
        with self._lock:
            self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); its slot is freed at the start of the next step."""
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        """Whether a step has work: waiting or running requests, or aborts to apply."""
        return bool(self.waiting or self.running or self._aborts)

    # ---- stepping ------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One scheduling step: aborts, admission and prefill, one decoded token for every running request."""
        return self.prefill_step() + self.decode_step()

    @torch.inference_mode()
    def prefill_step(self) -> list[StepOutput]:
        """Apply aborts, admit waiting requests and prefill them: at most `prefill_chunk` prompt tokens of each
        row per step (a longer prompt continues at the next step, while the others decode); a row whose prompt
        is complete samples its first token."""
        outputs = self._apply_aborts()
        pending = [r for r in self.running if r.prefilling]
        new = self._admit()
        start = len(self.running)
        for i, request in enumerate(new):
            request.slot = start + i
        self.running.extend(new)
        for request in new:
            request.length = self._reuse_prefix(request)  # prompt tokens whose K/V the prefix cache had
        rows = pending + new
        if not rows:
            return outputs
        begins = [r.length for r in rows]
        pieces = [self._piece(r) for r in rows]
        width = max(pieces)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # a row: [its virtual tokens] prompt [padding]
        prefixes = {}
        for i, (request, begin, n) in enumerate(zip(rows, begins, pieces)):
            tokens = request.prompt_ids[max(begin - request.virtual, 0): begin + n - request.virtual]
            ids[i, request.virtual if begin == 0 else 0:][: len(tokens)] = torch.tensor(tokens)
            if request.virtual and self.virtual_tokens(request.adapter) is not None:  # never chunked nor cached
                prefixes[i] = self.virtual_tokens(request.adapter)
            elif request.virtual:  # prefix tuning: its keys and values over the row's first p positions
                self.cache.prefix_kv[request.slot] = self.virtual_key_values(request.adapter)
        last = torch.tensor(pieces) - 1
        slots = [r.slot for r in rows]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        where = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=self.device)
        if any(begins) or not contiguous:  # rows start at their cached or prefilled length: explicit positions
            positions = torch.tensor(begins)[:, None] + torch.arange(width)
            kv_len = int(positions.max()) + 1
            allowed = (torch.arange(kv_len)[None, None, None, :] <= positions[:, None, :, None])
            self._prepare(where, positions.to(self.device), kv_len)
        else:
            positions = torch.arange(width).expand(len(rows), width)
            # causal mask; a row's padding comes after its prompt, so no real token ever attends to it
            allowed = torch.ones(width, width, dtype=torch.bool).tril()[None, None]
            self._prepare(where, None, width)
        try:
            logits = self._logits(ids, positions, allowed, [r.adapter for r in rows], last, prefixes)
        finally:
            self.cache.prefix_kv = {}
        for request, n in zip(rows, pieces):
            request.length += n
        done = [i for i, r in enumerate(rows) if not r.prefilling]
        for i in done:
            self._store_prefix(rows[i])
        return outputs + self._advance([rows[i] for i in done], logits[done])

    def _piece(self, request: Request) -> int:
        """Prompt tokens `request` prefills in this step: the rest of its prompt, at most prefill_chunk."""
        rest = request.virtual + len(request.prompt_ids) - request.length
        return rest if request.virtual or self.prefill_chunk is None else min(rest, self.prefill_chunk)

    @torch.inference_mode()
    def decode_step(self) -> list[StepOutput]:
        """One token for every running request."""
        running = list(self.running)
        if not running:
            return []
        # a row still prefilling (a chunked prompt) runs a placeholder token at the position its next chunk
        # overwrites; its logits are dropped
        ids = torch.tensor([[r.output_ids[-1] if r.output_ids else 0] for r in running])
        positions = torch.tensor([[r.length] for r in running])  # (B, 1): where each row's new token goes
        kv_len = int(positions.max()) + 1
        allowed = (torch.arange(kv_len)[None, :] <= positions)[:, None, None, :]  # (B, 1, 1, kv_len)
        self._prepare(slice(0, len(running)), positions.to(self.device), kv_len)
        logits = self._logits(ids, positions, allowed, [r.adapter for r in running], None, {})
        decoding = [i for i, r in enumerate(running) if not r.prefilling]
        for i in decoding:
            running[i].length += 1
        if len(decoding) < len(running):
            return self._advance([running[i] for i in decoding], logits[decoding])
        return self._advance(running, logits)

    def _caches(self) -> list[SlotKVCache]:
        """Every KV cache whose slots follow the running batch (one per model the engine drives)."""
        return [self.cache]

    def _prepare(self, rows: slice, positions: torch.Tensor | None, kv_len: int) -> None:
        for cache in self._caches():
            cache.prepare(rows, positions, kv_len)

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                names: list[str | None], last: torch.Tensor | None, prefixes: dict) -> torch.Tensor:
        """The logits to sample from, (B, vocab) fp32; a generation mode (Proxy-tuning) overrides this."""
        return self._forward(self.model, self.cache, ids, positions, allowed, names, last, prefixes)

    def _forward(self, model: nn.Module, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor,
                 allowed: torch.Tensor, names: list[str | None], last: torch.Tensor | None,
                 prefixes: dict | None = None) -> torch.Tensor:
        """Logits (B, vocab) in fp32 of `model` at position `last` of each row (None: the only position);
        `prefixes` (row -> (p, e) embeddings) replace the first p input embeddings of those rows."""
        inner, device = model.model, self.device
        attached = (id(model), *map(id, attached_adapters(model).values()))
        if attached not in self._eval_for:  # adapters attach in training mode: dropout would be live
            model.eval()
            self._eval_for = {a for a in self._eval_for if a[0] != id(model)} | {attached}
        fused = self.fused if model is self.model else _Unfused()
        ids, positions = ids.to(device), positions.to(device)
        amp = torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with amp, fused.apply(names) as routed, route(model, routed):
            h = inner.embed_tokens(ids)
            for row, prefix in (prefixes or {}).items():
                h[row, : prefix.shape[0]] = prefix.to(h.dtype)
            scores = self.autocast or h.dtype  # the dtype attention scores are computed in: the mask stays finite
            windows = sliding_windows(model.config)
            masks = {w: _additive_mask(allowed, positions, w, scores, device) for w in set(windows)}
            position_embeddings = inner.rotary_emb(h, positions)
            for layer, window in zip(inner.layers[: model.config.num_hidden_layers], windows):
                out = layer(h, attention_mask=masks[window], position_ids=positions, **{cache_kwarg(layer): cache},
                            use_cache=True, position_embeddings=position_embeddings)
                h = out[0] if isinstance(out, tuple) else out
            h = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=device), last.to(device)]
            return final_logit_softcap(model.config, model.lm_head(inner.norm(h)).float())  # (B, vocab)

    def fail_all(self) -> list[StepOutput]:
        """End every waiting and running request with finish_reason "error" (after a failed step) and reset."""
        with self._lock:
            failed, self.waiting = [*self.waiting, *self.running], deque()
        self.running = []
        for cache in self._caches():
            cache.clear()
        for request in failed:
            request.finish_reason, request.slot, request.finished_at = "error", None, time.perf_counter()
        return [StepOutput(r, [], "", True) for r in failed]

    def _apply_aborts(self) -> list[StepOutput]:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return []
            dropped = [r for r in self.waiting if r.id in aborts]
            self.waiting = deque(r for r in self.waiting if r.id not in aborts)
        dropped += [r for r in self.running if r.id in aborts]
        for request in dropped:
            self._finish(request, "abort")
        return [StepOutput(r, [], "", True) for r in dropped]

    def _admit(self) -> list[Request]:
        """Waiting requests that join this step, in arrival order. One whose first prompt block is being
        computed in this step by another (not cached yet) waits one step, then reuses it from the cache."""
        new: list[Request] = []
        computing: set = set()  # first-block keys that this step's prefill will store
        with self._lock:
            while self.waiting and len(self.running) + len(new) < self.max_batch_size:
                width = max(self._piece(r) for r in [*new, self.waiting[0]])
                if new and width * (len(new) + 1) > self.max_prefill_tokens:
                    break
                first = self._uncached_first_block(self.waiting[0])
                if first is not None and first in computing:
                    break
                new.append(self.waiting.popleft())
                if first is not None:
                    computing.add(first)
        return new

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        tokens = choose(logits, [r.params for r in requests], [r.generator for r in requests],
                        [r.output_ids for r in requests])
        now = time.perf_counter()
        outputs = []
        for i, (request, token) in enumerate(zip(requests, tokens)):
            request.first_token_at = request.first_token_at or now
            if request.params.logprobs is not None:  # the model's distribution, as a forward of the sequence gives
                request.logprobs.append((token, *top_logprobs(logits[i], token, request.params.logprobs)))
            request.output_ids.append(token)
            if token in self.eos_ids and not request.params.ignore_eos:
                request.finish_reason = "stop"
                request.stopped_by_eos = True
            elif len(request.output_ids) >= request.params.max_new_tokens:
                request.finish_reason = "length"
            text = new_text(request, self.tokenizer)
            if request.finished:
                self._finish(request, request.finish_reason)
            outputs.append(StepOutput(request, [token], text, request.finished,
                                      request.logprobs[-1:] if request.params.logprobs is not None else []))
        return outputs

    def _finish(self, request: Request, reason: str) -> None:
        """Mark `request` finished and give its slot to the last running request (one copy of its K/V)."""
        request.finish_reason = request.finish_reason or reason
        request.finished_at = time.perf_counter()
        slot = request.slot
        if slot is None:
            return
        last = self.running.pop()
        if last is not request:
            for cache in self._caches():
                cache.move(last.slot, slot, last.length)
            last.slot, self.running[slot] = slot, last
        request.slot = None

    # ---- offline -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], adapters: Sequence[AdapterSpec] | None = None, *,
                 max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | str = (), ignore_eos: bool = False) -> list[Completion]:
        """Generate for every prompt (adapter per prompt: a name, None for the base, or {name: weight})."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or token-id lists; wrap a single prompt in a list")
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters; give one adapter (or None) per prompt")
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple([stop] if isinstance(stop, str) else stop),
                                ignore_eos)
        requests = [self.add_request(p, a, params) for p, a in zip(prompts, adapters)]
        while not all(r.finished for r in requests):
            self.step()
        return [r.completion() for r in requests]


class _Unfused:
    @contextlib.contextmanager
    def apply(self, names):
        yield list(names)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple, set)) else [] if value is None else [value])
    return {int(i) for i in ids}
