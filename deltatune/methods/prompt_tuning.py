"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): p trainable virtual-token embeddings before the input.

    input_ids (B, T) ──► embed ──► x (B, T, e)
                                   │
    P (p × e, trainable) ──────► [P ; x] (B, p+T, e) ──► frozen decoder ──► logits (B, p+T, V)
    attention_mask (B, T)    ──► [1…1 ; mask]
    labels (B, T)            ──► [-100…-100 ; labels]

Only P is trained. As in peft's PeftModelForCausalLM, the logits include the p virtual positions, the
attention mask and labels are extended with ones and -100, and position ids are dropped (the model numbers
the p+T positions 0, 1, ...; left padding is not skipped), so logits and greedy generation equal peft's.
The mechanism is two forward pre-hooks, kept by the adapter's part and removed with it: one on the decoder
(`model.get_decoder()`: the embeddings, mask and positions, whoever calls it: the model, `generate`, or
deltatune's chunked loss) and one on the root model (the labels). With a cache that already holds the
prompt (a decoding step of `generate`), only the mask grows by p; the cache is looked for under both
names transformers has used for it (`past_key_values`, and `cache` from 5.25 on).

Initialisation (`prompt_tuning_init`, as peft): "RANDOM" draws N(0, 1) (nn.Embedding's default, as peft;
the paper draws U(-0.5, 0.5)); "SAMPLE_VOCAB" copies the input embeddings of p token ids drawn uniformly from
the whole vocabulary (the paper samples the 5,000 most common tokens); "TEXT" embeds the tokenized
`prompt_tuning_init_text`, repeated or cut to p tokens, tokenized by `tokenizer_name_or_path` or, from
Python, a `tokenizer` object. Files keep P under peft's key `prompt_embeddings`; they move both ways with peft.

Mixed batches (`deltatune.route`): rows of a prompt adapter get its tokens; the other rows (other methods, the
base) get as many masked positions (attention 0, label -100), and prompts of different lengths are padded to
the longest, masked positions first. Positions are then given per row (0.. for its own virtual tokens, then
its tokens), so each row computes exactly what it computes alone.

Learning rate: far higher than LoRA's. Lester et al. train with Adafactor at lr 0.3; with AdamW,
3e-2 to 3e-1 (deltatune train: `--optim.lr 3e-2`). Merging folds nothing: `deltatune.merge` leaves the
weights and the prompt as they are (the virtual tokens stay prepended), and `merge_and_unload` drops the
prompt with the adapter, so the model it returns no longer has one.
Not supported: encoder-decoder models (num_transformer_submodules=2), task types other than causal LM,
packed rows (several examples in a row would share one prompt), per-token routing.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int
from ..core.model import active_adapters
from ..core.registry import register
from ..core.routing import current_plan

IGNORE_INDEX = -100
_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
_NO_TARGETS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """peft's PromptTuningConfig, written with the same keys.

    num_virtual_tokens: p, the prompt length (peft has no default; 20 here; the paper tries 1 to 150).
    token_dim, num_layers, num_attention_heads, num_transformer_submodules: filled in from the model at
        attach, as peft does; a token_dim that does not fit the model is an error.
    prompt_tuning_init: "RANDOM", "SAMPLE_VOCAB" or "TEXT" (then prompt_tuning_init_text, and the tokenizer
        as tokenizer_name_or_path (+ tokenizer_kwargs) or, from Python, `tokenizer=`; never written to files).
    Recommended learning rate: 3e-2 to 3e-1 (AdamW), some 100x LoRA's; the paper uses 0.3 with Adafactor.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    recommended_lr: ClassVar[float] = 3e-2  # virtual tokens need a far higher lr than weights (Lester et al. used 0.3)

    task_type: str | None = "CAUSAL_LM"  # what peft's PeftModel.from_pretrained dispatches on
    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    tokenizer: Any = field(default=None, compare=False, repr=False)  # Python only: a tokenizer object for TEXT

    def validate(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for key in ("token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key))
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={self.num_transformer_submodules!r}: deltatune's prompt "
                              "tuning supports decoder-only models (1); encoder-decoder prompts (2) are not supported")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"task_type={self.task_type!r}: deltatune's prompt tuning supports causal LMs "
                              "(task_type 'CAUSAL_LM')")
        given = [key for key in _NO_TARGETS if getattr(self, key) is not None]
        if given:
            raise ConfigError(f"{given[0]} is set, but prompt tuning adds virtual tokens at the input and targets "
                              "no modules; remove it")
        if self.prompt_tuning_init not in _INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {', '.join(_INITS)}, got {self.prompt_tuning_init!r}")
        if isinstance(self.tokenizer, str):
            raise ConfigError("tokenizer must be a tokenizer object; give a name or path as tokenizer_name_or_path")
        if self.tokenizer is not None and not self.tokenizer_name_or_path:  # peft refuses TEXT files without it
            object.__setattr__(self, "tokenizer_name_or_path", getattr(self.tokenizer, "name_or_path", None) or None)
        if self.prompt_tuning_init == "TEXT":
            if self.prompt_tuning_init_text is None:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if not self.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer directory or "
                                  "hub id; from Python also tokenizer=<tokenizer object> with a name_or_path)")
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs is set, but it is used only with prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        """peft's keys exactly: no target keys (prompt learning has none) and no tokenizer object."""
        out = super().to_dict()
        for key in (*_NO_TARGETS, "tokenizer"):
            out.pop(key)
        return out


def _input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's (base) input embedding: a LoRA-adapted one is looked through to its base layer."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    embedding = getattr(embedding, "base_layer", embedding)
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"prompt tuning needs a model whose get_input_embeddings() is an nn.Embedding; "
                          f"{type(model).__name__} gives {type(embedding).__name__}")
    return embedding


def resolve(model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
    """The config with token_dim, num_layers, num_attention_heads and num_transformer_submodules from the model."""
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; deltatune's prompt tuning supports "
                          "decoder-only causal LMs")
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        raise ConfigError(f"{type(model).__name__} is not a causal LM (it cannot generate); deltatune's prompt "
                          "tuning supports causal LMs (a classification head would read the wrong positions)")
    dim = _input_embedding(model).embedding_dim
    if config.token_dim is not None and config.token_dim != dim:
        raise ConfigError(f"token_dim is {config.token_dim}, but the model's input embeddings have {dim} dimensions; "
                          "this prompt was made for another model (or set token_dim to null)")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

    def first(*keys: str) -> int | None:
        return next((getattr(text, k) for k in keys if isinstance(getattr(text, k, None), int)), None)

    return config.replace(
        token_dim=dim, num_transformer_submodules=1,
        num_layers=config.num_layers or first("num_hidden_layers", "num_layers", "n_layer"),
        num_attention_heads=config.num_attention_heads or first("num_attention_heads", "n_head", "num_heads"),
    )


def initial_prompt(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """P at start (p, e) in fp32, drawn as peft draws it (same values under the same seed)."""
    embedding = _input_embedding(model)
    p = config.num_virtual_tokens
    prompt = torch.empty(p, config.token_dim).normal_()  # nn.Embedding's init; peft draws it for every init
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":  # a loaded file overwrites it
        return prompt
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, embedding.num_embeddings, (p,), dtype=torch.long)
    else:
        ids = torch.tensor(_text_ids(config, p, embedding.num_embeddings), dtype=torch.long)
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).detach().to("cpu", torch.float32)


def _text_ids(config: PromptTuningConfig, p: int, vocab: int) -> list[int]:
    """The init text's token ids, repeated or cut to p (peft's rule)."""
    tokenizer = config.tokenizer
    if tokenizer is None:
        from transformers import AutoTokenizer

        from ..models import resolve_model_path

        kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}  # as peft
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.tokenizer_name_or_path), **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens")
    if max(ids) >= vocab:
        raise ConfigError(f"the tokenizer of tokenizer_name_or_path={config.tokenizer_name_or_path!r} gives token id "
                          f"{max(ids)}, but the model's vocabulary has {vocab} tokens; use the model's own tokenizer")
    return (ids * math.ceil(p / len(ids)))[:p]


@dataclass
class _Layout:
    """How the virtual positions of one batch are laid out: P of them before every row."""

    P: int
    groups: list[tuple["VirtualTokens", torch.Tensor]]  # (prompt, its rows); one group of all rows if uniform
    lengths: torch.Tensor | None  # (B,) p of each row (0: no prompt); None when every row has the same prompt

    def prefix(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, P, e) virtual embeddings, masked positions zero and first, in `like`'s dtype."""
        if self.lengths is None:
            weight = self.groups[0][0].prompt_embeddings.to(like.dtype)
            return weight.unsqueeze(0).expand(batch, -1, -1)
        out = like.new_zeros(batch, self.P, like.shape[-1])
        for part, rows in self.groups:
            out[rows.to(out.device), self.P - part.p:] = part.prompt_embeddings.to(like.dtype)
        return out

    def mask_and_positions(self, mask, batch, length, past, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The attention mask over [virtual ; cache ; new] and the new tokens' positions (None: the model's own)."""
        if self.lengths is None:  # peft's layout: ones before the mask, positions 0, 1, ... over everything
            ones = torch.ones(batch, self.P, dtype=mask.dtype, device=mask.device) if mask is not None else None
            return (torch.cat((ones, mask), dim=1) if mask is not None else None), None
        lengths = self.lengths.to(device)
        start = self.P - lengths  # first virtual position of each row (B,)
        prefix_mask = (torch.arange(self.P, device=device) >= start[:, None]).long()  # (B, P)
        if mask is None:
            mask = torch.ones(batch, past + length - (self.P if past else 0), dtype=torch.long, device=device)
        mask = torch.cat((prefix_mask.to(mask.dtype), mask.to(device)), dim=1)
        # each row numbered as if alone: its virtual tokens 0..p-1, then its tokens from p
        if past:  # a decoding step: the cache holds the P prefix positions and the earlier tokens
            return mask, (lengths + past - self.P)[:, None] + torch.arange(length, device=device)
        prefix_pos = (torch.arange(self.P, device=device) - start[:, None]).clamp(min=0)  # masked ones: 0
        return mask, torch.cat((prefix_pos, lengths[:, None] + torch.arange(length, device=device)), dim=1)


class VirtualTokens(nn.Module):
    """One adapter's prompt P (p, e), the `deltatune_parts[name]` of prompt tuning; hooks into the model.

    Every prompt part hooks the model, and the first one in `model.deltatune_parts` serves them all (a mixed
    batch pads all prompts to one length), so removing any part leaves the others working.
    """

    def __init__(self, model: nn.Module, config: PromptTuningConfig, name: str) -> None:
        super().__init__()
        self.name, self.p, self.disabled = name, config.num_virtual_tokens, False
        device = _input_embedding(model).weight.device
        self.prompt_embeddings = nn.Parameter(initial_prompt(model, config).to(device))  # (p, e), fp32 as peft
        decoder = _decoder(model)
        self._handles = [decoder.register_forward_pre_hook(partial(self._decoder_hook, model), with_kwargs=True)]
        if decoder is not model:
            self._handles.append(model.register_forward_pre_hook(partial(self._labels_hook, model), with_kwargs=True))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings}  # peft's key, without the base_model prefix

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
        past = _past_length(_cache(kwargs))
        if not past:  # prefill: the prompt goes in front of the embeddings
            embeds = embeds if embeds is not None else model.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat((layout.prefix(batch, embeds), embeds), dim=1)  # (B, P+T, e)
            kwargs["input_ids"] = None
        device = (embeds if embeds is not None else ids).device
        kwargs["attention_mask"], kwargs["position_ids"] = layout.mask_and_positions(mask, batch, length, past, device)
        if module is model:
            self._extend_labels(kwargs, layout, past)
        return (), kwargs

    def _labels_hook(self, model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        kwargs = _as_kwargs(module, args, kwargs)
        labels = kwargs.get("labels")
        if labels is None or not self._serves(model):
            return None
        layout = _layout(model, labels.shape[0])
        if layout is None or _past_length(_cache(kwargs)):
            return None
        self._extend_labels(kwargs, layout, 0)
        return (), kwargs

    @staticmethod
    def _extend_labels(kwargs: dict, layout: _Layout, past: int) -> None:
        labels = kwargs.get("labels")
        if labels is not None and not past:
            pad = torch.full((labels.shape[0], layout.P), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat((pad, labels), dim=1)

    def _serves(self, model: nn.Module) -> bool:
        """Whether this part's hooks act: only the first prompt part's, for all of them."""
        return next(iter(_prompt_parts(model).values()), None) is self


def _prompt_parts(model: nn.Module) -> dict[str, VirtualTokens]:
    parts = getattr(model, "deltatune_parts", None) or {}
    return {name: part for name, part in parts.items() if isinstance(part, VirtualTokens)}


def _layout(model: nn.Module, batch: int) -> _Layout | None:
    """The virtual positions this forward needs: from the routing plan if any, else the active prompt adapter."""
    parts = {n: p for n, p in _prompt_parts(model).items() if not p.disabled}
    plan = current_plan()
    if plan is None:
        active = [n for n in active_adapters(model) if n in parts]
        if len(active) > 1:
            raise ValueError(f"prompt-tuning adapters {active} are active together; a row takes one prompt. Make one "
                             "active (deltatune.set_active), or give each row its own with deltatune.route")
        return _Layout(parts[active[0]].p, [(parts[active[0]], torch.arange(batch))], None) if active else None
    if plan.per_token:
        used = [n for n in plan.names() if n in parts]
        if used:
            raise ValueError(f"adapter {used[0]!r} is a prompt-tuning adapter, which adds positions to a row; "
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
    if len(used) == 1 and None not in rows:
        return _Layout(parts[used[0]].p, [(parts[used[0]], torch.arange(batch))], None)
    groups = [(parts[n], torch.tensor([i for i, r in enumerate(rows) if r == n])) for n in used]
    lengths = torch.tensor([parts[n].p if n is not None else 0 for n in rows])
    return _Layout(int(lengths.max()), groups, lengths)


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


_CACHE_KEYS = ("past_key_values", "cache")  # transformers <= 5.24 names it past_key_values; 5.25 passes cache=


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
        raise ValueError(f"prompt tuning needs a 2D attention mask (batch, tokens), got shape {tuple(mask.shape)}")
    if mask is None and position_ids is not None and position_ids.shape[-1] > 1:
        if (position_ids[..., 1:] != position_ids[..., :-1] + 1).any():
            raise ValueError("these rows are packed (position_ids restart inside a row), but prompt tuning prepends "
                             "one prompt per row, which the later examples would not see; turn packing off "
                             "(data.packing: false)")


def inject(model: nn.Module, config: PromptTuningConfig, name: str) -> VirtualTokens:
    return VirtualTokens(model, config, name)


register(PromptTuningConfig, inject=inject, resolve=resolve, readers=("peft", "deltatune"))
