"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): p trainable virtual-token embeddings before the input.

    input_ids (B, T) ──► embed ──► x (B, T, e)
                                   │
    P (p × e, trainable) ──────► [P ; x] (B, p+T, e) ──► frozen decoder ──► logits (B, p+T, V)
    attention_mask (B, T)    ──► [1…1 ; mask]
    labels (B, T)            ──► [-100…-100 ; labels]

Only P is trained. The mechanism (hooks on the decoder and the root model, peft's layout of mask, labels and
positions, decoding steps, mixed batches) is the virtual-token base shared with P-tuning and prefix tuning,
`deltatune.methods.virtual_tokens`; this file says what prompt tuning adds to a row: P itself.

Initialisation (`prompt_tuning_init`, as peft): "RANDOM" draws N(0, 1) (nn.Embedding's default, as peft;
the paper draws U(-0.5, 0.5)); "SAMPLE_VOCAB" copies the input embeddings of p token ids drawn uniformly from
the whole vocabulary (the paper samples the 5,000 most common tokens); "TEXT" embeds the tokenized
`prompt_tuning_init_text`, repeated or cut to p tokens, tokenized by `tokenizer_name_or_path` or, from
Python, a `tokenizer` object. Files keep P under peft's key `prompt_embeddings`; they move both ways with peft.

Learning rate: far higher than LoRA's. Lester et al. train with Adafactor at lr 0.3; with AdamW,
3e-2 to 3e-1 (deltatune train: `--optim.lr 3e-2`). Merging folds nothing: `deltatune.merge` leaves the
weights and the prompt as they are (the virtual tokens stay prepended), and `merge_and_unload` drops the
prompt with the adapter, so the model it returns no longer has one.
Not supported: encoder-decoder models (num_transformer_submodules=2), task types other than causal LM,
packed rows (several examples in a row would share one prompt), per-token routing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.registry import register
from .virtual_tokens import PromptLearningConfig, VirtualPart, input_embedding, resolve_prompt_learning

_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    """peft's PromptTuningConfig, written with the same keys.

    num_virtual_tokens: p, the prompt length (peft has no default; 20 here; the paper tries 1 to 150).
    token_dim, num_layers, num_attention_heads, num_transformer_submodules: filled in from the model at
        attach, as peft does; a token_dim that does not fit the model is an error.
    prompt_tuning_init: "RANDOM", "SAMPLE_VOCAB" or "TEXT" (then prompt_tuning_init_text, and the tokenizer
        as tokenizer_name_or_path (+ tokenizer_kwargs) or, from Python, `tokenizer=`; never written to files).
    Recommended learning rate: 3e-2 to 3e-1 (AdamW), some 100x LoRA's; the paper uses 0.3 with Adafactor.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    method_name: ClassVar[str] = "prompt tuning"
    recommended_lr: ClassVar[float] = 3e-2  # virtual tokens need a far higher lr than weights (Lester et al. used 0.3)

    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    tokenizer: Any = field(default=None, compare=False, repr=False)  # Python only: a tokenizer object for TEXT

    def validate(self) -> None:
        super().validate()
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
        out.pop("tokenizer")
        return out


def resolve(model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
    """The config with token_dim, num_layers, num_attention_heads and num_transformer_submodules from the model."""
    return resolve_prompt_learning(model, config)


def initial_prompt(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """P at start (p, e) in fp32, drawn as peft draws it (same values under the same seed)."""
    embedding = input_embedding(model)
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


class VirtualTokens(VirtualPart):
    """One adapter's prompt P (p, e), the `deltatune_parts[name]` of prompt tuning, prepended to every row."""

    def __init__(self, model: nn.Module, config: PromptTuningConfig, name: str) -> None:
        super().__init__(model, name, config.num_virtual_tokens)
        device = input_embedding(model).weight.device
        self.prompt_embeddings = nn.Parameter(initial_prompt(model, config).to(device))  # (p, e), fp32 as peft

    def row_embeddings(self) -> torch.Tensor:
        return self.prompt_embeddings

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings}  # peft's key, without the base_model prefix


def inject(model: nn.Module, config: PromptTuningConfig, name: str) -> VirtualTokens:
    return VirtualTokens(model, config, name)


register(PromptTuningConfig, inject=inject, resolve=resolve, readers=("peft", "deltatune"))
