"""The virtual-token base shared by prompt tuning, P-tuning and prefix tuning: p positions before every row.

    embeddings kind (prompt tuning, P-tuning):  inputs_embeds ──► [V ; x] (B, p+T, e), mask [1…1 ; m], labels [-100… ; y]
    key_values kind (prefix tuning):            every layer's cache starts with p keys and values; mask [1…1 ; m]

A method's part subclasses `VirtualPart` and says what it adds to a row: `row_embeddings()` (p, e) or
`row_key_values()` (n_layers, 2, kv_heads, p, head_dim). Everything else is written once: the config fields
peft's prompt-learning configs share (`PromptLearningConfig`, `resolve_prompt_learning`: in `prompt_learning.py`,
importable from here), the two forward pre-hooks (on the decoder: `model.get_decoder()`, so the model,
`generate` and deltatune's chunked loss all get the positions; on the root: the labels), the layout of a mixed
batch, and the checks on the inputs.

As in peft's PeftModelForCausalLM, position ids are dropped for a batch of one adapter (the model numbers
the positions 0, 1, ... for embeddings, p, p+1, ... after a prefix in the cache; left padding is not
skipped), so logits and greedy generation equal peft's forward passes. A decoding step (a cache that already
holds the virtual positions) only grows the mask by p; the cache is looked for under both names transformers
has used for it (`past_key_values`, and `cache` from 5.25 on).

Mixed batches (`deltatune.route`): rows of one kind's adapters get their positions; other rows (other
methods, the base) get as many masked positions, prompts of different lengths are padded to the longest,
masked positions first, and each row is numbered as if alone. Rows of both kinds in one batch are refused.
Every part hooks the model and the first one in `model.deltatune_parts` serves them all, so removing any
part leaves the others working.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import active_adapters
from ..core.registry import SavedView
from ..core.routing import current_plan
from .prompt_learning import (  # noqa: F401  (re-exported: the config side lives in prompt_learning.py)
    PromptLearningConfig,
    input_embedding,
    resolve_prompt_learning,
    text_config_int,
)

IGNORE_INDEX = -100
# Why a part of the key_values kind cannot train under gradient checkpointing (the forward refuses, and so does a
# training config, through PrefixTuningConfig.gradient_checkpointing_problem)
KEY_VALUES_CHECKPOINTING = (
    "prefix tuning puts its keys and values into every layer's cache, which transformers' gradient checkpointing "
    "drops in each layer; set gradient_checkpointing: false (peft's prefix tuning has the same limit)")
_CACHE_KEYS = ("past_key_values", "cache")  # transformers <= 5.24 names it past_key_values; 5.25 passes cache=


# ---- the part ---------------------------------------------------------------------------------------------
class VirtualPart(nn.Module):
    """One adapter's virtual positions (`model.deltatune_parts[name]`); subclasses say what they add to a row.

    kind: "embeddings" (`row_embeddings()`: (p, e) before the row's input embeddings) or "key_values"
        (`row_key_values()`: (n_layers, 2, kv_heads, p, head_dim) at the start of every layer's cache).
    """

    kind: ClassVar[str] = "embeddings"

    def __init__(self, model: nn.Module, name: str, p: int) -> None:
        super().__init__()
        self.name, self.p, self.disabled = name, p, False
        decoder = _decoder(model)
        self._cache_key = next((k for k in _CACHE_KEYS if k in inspect.signature(decoder.forward).parameters),
                               _CACHE_KEYS[0])
        self._handles = [decoder.register_forward_pre_hook(partial(self._decoder_hook, model), with_kwargs=True)]
        if decoder is not model:
            self._handles.append(model.register_forward_pre_hook(partial(self._labels_hook, model), with_kwargs=True))

    def row_embeddings(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} adds key/value positions, not embeddings")

    def row_key_values(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} adds embeddings, not key/value positions")

    # ---- the file: what it holds may be derived from the live tensors (an encoder's output) ---------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds (keys without peft's prefix): by default the live `tensors()`."""
        return self.tensors()

    def live_from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The live tensors (`tensors()` keys) that reproduce the file's `tensors`; by default the same ones."""
        return tensors

    def _live_with_offset(self, tensors: dict[str, torch.Tensor], encoded: Any, offset: torch.Tensor,
                          offset_key: str) -> dict[str, torch.Tensor]:
        """`live_from_file` of a part whose file holds an encoder's output: the live encoder as it stands, and the
        offset (`offset_key`) that makes `encoded() + offset` equal the file's `prompt_embeddings`."""
        target = tensors["prompt_embeddings"]
        if tuple(target.shape) != tuple(offset.shape):
            raise ValueError(f"tensor prompt_embeddings has shape {tuple(target.shape)} but the model needs "
                             f"{tuple(offset.shape)}")
        with torch.no_grad():
            value = target.to(offset) - encoded()
        return {**{k: v.detach() for k, v in self.tensors().items()}, offset_key: value}

    def remove(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- the hooks ----------------------------------------------------------------------------------
    def _decoder_hook(self, model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not self._serves(model):
            return None
        kwargs = _as_kwargs(module, args, kwargs)
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        batch, length = (embeds.shape[:2] if embeds is not None else ids.shape[:2])
        layout = _layout(model, batch)
        if layout is None:
            return None
        mask = kwargs.get("attention_mask")
        _check_inputs(mask, kwargs.get("position_ids"))
        cache = _cache(kwargs)
        past = _past_length(cache)
        device = (embeds if embeds is not None else ids).device
        if layout.kind == "embeddings" and not past:  # prefill: the prompt goes in front of the embeddings
            embeds = embeds if embeds is not None else model.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat((layout.prefix(batch, embeds), embeds), dim=1)  # (B, P+T, e)
            kwargs["input_ids"] = None
        elif layout.kind == "key_values" and not past:  # prefill: every layer's cache starts with the prefix
            if module.training and any(getattr(m, "gradient_checkpointing", False) is True for m in (module, model)):
                raise ValueError(KEY_VALUES_CHECKPOINTING)
            keeps = cache is not None or (kwargs.get("use_cache") is not False and not torch.is_grad_enabled())
            kwargs[self._cache_key] = layout.fill_cache(model, cache, batch, device, keeps=keeps)
            kwargs.update({k: None for k in _CACHE_KEYS if k != self._cache_key and k in kwargs})
            past = layout.P  # the new tokens now come after P cached positions
        kwargs["attention_mask"], kwargs["position_ids"] = layout.mask_and_positions(mask, batch, length, past, device)
        if module is model and layout.kind == "embeddings":
            _extend_labels(kwargs, layout, past)
        return (), kwargs

    def _labels_hook(self, model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        kwargs = _as_kwargs(module, args, kwargs)
        labels = kwargs.get("labels")
        if labels is None or not self._serves(model):
            return None
        layout = _layout(model, labels.shape[0])
        if layout is None or layout.kind != "embeddings" or _past_length(_cache(kwargs)):
            return None
        _extend_labels(kwargs, layout, 0)
        return (), kwargs

    def _serves(self, model: nn.Module) -> bool:
        """Whether this part's hooks act: only the first virtual part's, for all of them."""
        return next(iter(virtual_parts(model).values()), None) is self


def file_view(model: nn.Module, adapter: Any, tensors: dict[str, torch.Tensor]) -> SavedView:
    """The registry's `save_view` of a virtual-token method: the part's file tensors in place of its live ones
    (P-tuning's encoder output in place of the encoder; checkpoints keep the encoder)."""
    part = adapter.part(model)
    live = set(part.tensors())
    return SavedView(adapter.config, {**{k: v for k, v in tensors.items() if k not in live}, **part.file_tensors()})


def _extend_labels(kwargs: dict, layout: "_Layout", past: int) -> None:
    labels = kwargs.get("labels")
    if labels is not None and not past:
        pad = torch.full((labels.shape[0], layout.P), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat((pad, labels), dim=1)


def virtual_parts(model: nn.Module) -> dict[str, VirtualPart]:
    parts = getattr(model, "deltatune_parts", None) or {}
    return {name: part for name, part in parts.items() if isinstance(part, VirtualPart)}


@dataclass
class _Layout:
    """How the virtual positions of one batch are laid out: P of them before every row."""

    P: int
    kind: str
    groups: list[tuple[VirtualPart, torch.Tensor]]  # (part, its rows); one group of all rows if uniform
    lengths: torch.Tensor | None  # (B,) p of each row (0: no prompt); None when every row has the same part

    def prefix(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, P, e) virtual embeddings, masked positions zero and first, in `like`'s dtype."""
        if self.lengths is None:
            return self.groups[0][0].row_embeddings().to(like.dtype).unsqueeze(0).expand(batch, -1, -1)
        out = like.new_zeros(batch, self.P, like.shape[-1])
        for part, rows in self.groups:
            out[rows.to(out.device), self.P - part.p:] = part.row_embeddings().to(like.dtype)
        return out

    def fill_cache(self, model: nn.Module, cache: Any, batch: int, device: torch.device, keeps: bool = True) -> Any:
        """`cache` (if None a new DynamicCache, or with keeps=False a `PrefixOnly` one) holding the P prefix keys
        and values of every layer."""
        from transformers import DynamicCache

        cache = cache if cache is not None else (DynamicCache if keeps else _prefix_only())(config=model.config)
        update = DynamicCache.update if not keeps else type(cache).update
        first = self.groups[0][0].row_key_values()  # (L, 2, h, p, d)
        dtype = next(model.parameters()).dtype
        layers, _, heads, _, head_dim = first.shape
        if self.lengths is None:
            kv = first.to(device, dtype).unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)  # (L, 2, B, h, p, d)
        else:
            kv = torch.zeros(layers, 2, batch, heads, self.P, head_dim, dtype=dtype, device=device)
            for part, rows in self.groups:
                kv[:, :, rows.to(device), :, self.P - part.p:] = part.row_key_values().to(device, dtype).unsqueeze(2)
        for layer in range(layers):
            update(cache, kv[layer, 0], kv[layer, 1], layer)
        return cache

    def mask_and_positions(self, mask, batch, length, past, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The attention mask over [virtual ; cache ; new] and the new tokens' positions (None: the model's own)."""
        if self.lengths is None:  # peft's layout: ones before the mask, the model's own positions
            ones = torch.ones(batch, self.P, dtype=mask.dtype, device=mask.device) if mask is not None else None
            return (torch.cat((ones, mask), dim=1) if mask is not None else None), None
        lengths = self.lengths.to(device)
        start = self.P - lengths  # first virtual position of each row (B,)
        prefix_mask = (torch.arange(self.P, device=device) >= start[:, None]).long()  # (B, P)
        if mask is None:
            mask = torch.ones(batch, past + length - (self.P if past else 0), dtype=torch.long, device=device)
        mask = torch.cat((prefix_mask.to(mask.dtype), mask.to(device)), dim=1)
        # each row numbered as if alone: its virtual tokens 0..p-1, then its tokens from p
        if past:  # a decoding step (or a prefix in the cache): the cache holds the P virtual positions first
            return mask, (lengths + past - self.P)[:, None] + torch.arange(length, device=device)
        prefix_pos = (torch.arange(self.P, device=device) - start[:, None]).clamp(min=0)  # masked ones: 0
        return mask, torch.cat((prefix_pos, lengths[:, None] + torch.arange(length, device=device)), dim=1)


_PREFIX_ONLY: list[type] = []


def _prefix_only() -> type:
    """A DynamicCache that holds the prefix and keeps nothing else: `update` returns [prefix ; new] and stores
    nothing, for a forward that wants no cache back (training, use_cache=False): nothing accumulates in it."""
    if not _PREFIX_ONLY:
        from transformers import DynamicCache

        class PrefixOnly(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                layer = self.layers[layer_idx]
                return (torch.cat((layer.keys, key_states), dim=-2), torch.cat((layer.values, value_states), dim=-2))

        _PREFIX_ONLY.append(PrefixOnly)
    return _PREFIX_ONLY[0]


def _layout(model: nn.Module, batch: int) -> _Layout | None:
    """The virtual positions this forward needs: from the routing plan if any, else the active virtual adapter."""
    parts = {n: p for n, p in virtual_parts(model).items() if not p.disabled}
    plan = current_plan()
    if plan is None:
        active = [n for n in active_adapters(model) if n in parts]
        if len(active) > 1:
            raise ValueError(f"virtual-token adapters {active} are active together; a row takes one prompt. Make one "
                             "active (deltatune.set_active), or give each row its own with deltatune.route")
        if not active:
            return None
        part = parts[active[0]]
        return _Layout(part.p, part.kind, [(part, torch.arange(batch))], None)
    if plan.per_token:
        used = [n for n in plan.names() if n in parts]
        if used:
            raise ValueError(f"adapter {used[0]!r} is a virtual-token adapter, which adds positions to a row; "
                             "route it per row (deltatune.route(model, names)), not per token")
        return None
    if plan.size != batch:
        raise ValueError(f"mixed batch routes {plan.size} rows but the model received a batch of {batch}; give one "
                         "adapter name per row")
    rows = [plan.adapters[i] for i in plan.ids.tolist()]
    rows = [n if n in parts else None for n in rows]
    used = [n for n in dict.fromkeys(rows) if n is not None]
    if not used:
        return None
    kinds = {parts[n].kind for n in used}
    if len(kinds) > 1:
        raise ValueError(f"this batch mixes rows of prefix tuning ({', '.join(n for n in used if parts[n].kind == 'key_values')}) "
                         f"and of input-embedding prompts ({', '.join(n for n in used if parts[n].kind == 'embeddings')}); "
                         "route them in separate batches")
    kind = kinds.pop()
    if len(used) == 1 and None not in rows:
        return _Layout(parts[used[0]].p, kind, [(parts[used[0]], torch.arange(batch))], None)
    groups = [(parts[n], torch.tensor([i for i, r in enumerate(rows) if r == n])) for n in used]
    lengths = torch.tensor([parts[n].p if n is not None else 0 for n in rows])
    return _Layout(int(lengths.max()), kind, groups, lengths)


# ---- inputs -----------------------------------------------------------------------------------------------
def _decoder(model: nn.Module) -> nn.Module:
    """The module that embeds input_ids (a CausalLM's `model`), so calls to it alone get the prompt too."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    if isinstance(decoder, nn.Module) and "inputs_embeds" in inspect.signature(decoder.forward).parameters:
        return decoder
    return model


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of `module.forward` moved into its keyword arguments."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}


def _cache(kwargs: dict) -> Any:
    """The KV cache a forward was handed, under either name (None: no cache, a prefill or a plain forward)."""
    return next((kwargs[key] for key in _CACHE_KEYS if kwargs.get(key) is not None), None)


def _past_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def _check_inputs(mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> None:
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"virtual tokens need a 2D attention mask (batch, tokens), got shape {tuple(mask.shape)}")
    if mask is None and position_ids is not None and position_ids.shape[-1] > 1:
        if (position_ids[..., 1:] != position_ids[..., :-1] + 1).any():
            raise ValueError("these rows are packed (position_ids restart inside a row), but virtual tokens come "
                             "once per row, which the later examples would not see; turn packing off "
                             "(data.packing: false)")
