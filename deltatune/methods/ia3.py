"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, arXiv:2205.05638, T-Few).

One learned vector per adapted layer rescales activations element-wise (paper §3.3: keys, values and the
feed-forward intermediate activation). On Linear layers, as peft implements it:

    output target        h = l ⊙ (W x + b)       l: (d_out, 1)   forward(x, y) = l ⊙ y
    feedforward target   h = W (l ⊙ x) + b       l: (1, d_in)    transform_input(x) = l ⊙ x

Scaling the input of the down projection is scaling the intermediate activation γ(W₁x) of the paper's FFN.
l starts at ones, so the adapted model equals the base at step 0. Both forms fold into the weight:
output W ← diag(l)·W, b ← l ⊙ b; feedforward W ← W·diag(l), b unchanged; unmerge divides by l (exact up to
rounding; l must have no zeros).

Stacked with other deltas on one site it applies in attach order: attached after a LoRA, an output vector
scales the LoRA-adapted output (and a feedforward vector the input of both); attached before, it does not.

File: exactly peft's: `peft_type: "IA3"`, the keys of peft's IA3Config, and one tensor per layer,
`<module>.ia3_l`, of shape (d_out, 1) or (1, d_in). peft's IA3Config has no layers_to_transform /
layers_pattern; they are refused here (select layers with a target_modules regex) and never written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError
from ..core.delta import Delta
from ..core.registry import register
from ..core.sites import Stage, Target, weight_kind

# peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING (peft 0.21.2)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"), "mt5": ("k", "v", "wi_1"), "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"), "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"), "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"), "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"), "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"), "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"), "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"), "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"), "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"), "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"), "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"), "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "qwen3": ("q_proj", "v_proj", "down_proj"),
}
DEFAULT_FEEDFORWARD: dict[str, tuple[str, ...]] = {
    "t5": ("wo",), "mt5": (), "gpt2": ("mlp.c_proj",), "bloom": ("mlp.dense_4h_to_h",), "roberta": ("output.dense",),
    "opt": ("fc2",), "gptj": ("fc_out",), "gpt_neox": ("dense_4h_to_h",), "gpt_neo": ("c_proj",), "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",), "llama": ("down_proj",), "llama4": ("down_proj",), "mistral": ("down_proj",),
    "mixtral": ("w2",), "bert": ("output.dense",), "deberta-v2": ("output.dense",), "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",), "RefinedWebModel": ("dense_4h_to_h",), "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",), "gemma": ("down_proj",), "gemma2": ("down_proj",), "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",), "qwen3": ("down_proj",),
}
_NOT_IN_PEFT = ("layers_to_transform", "layers_pattern")  # AdapterConfig fields peft's IA3Config lacks


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)³ settings; every field is the peft `IA3Config` field of the same name and default.

    Recommended learning rate: 3e-3 (T-Few, paper §3.3 and App. B; far higher than LoRA's ~2e-4).
    feedforward_modules: the targets whose *input* is scaled (the FFN's down projection); a list (exact name or
        suffix, as peft: the module name ends with an entry) or a full-match regex. None means the
        architecture's default (Llama: down_proj). When both are lists, each entry must name a target.
    init_ia3_weights: True starts every vector at ones (no change to the model); False draws N(0, 1) (tests).
    fan_in_fan_out: the target stores W as (d_in, d_out) (GPT-2 Conv1D; detected from the layer, so ignored).
    target_modules None means peft's default for the architecture (Llama: k_proj, v_proj, down_proj).
    """

    peft_type: ClassVar[str] = "IA3"
    recommended_lr: ClassVar[float] = 3e-3  # T-Few
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS

    feedforward_modules: str | tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def validate(self) -> None:
        for name in _NOT_IN_PEFT:
            if getattr(self, name) is not None:
                raise ConfigError(
                    f"IA3Config has no {name} (peft's IA3Config has none either, so the file could not hold it); "
                    "choose layers with a target_modules regex instead, e.g. r'.*\\.layers\\.(0|1)\\..*(k_proj|v_proj)'"
                )
        if isinstance(self.feedforward_modules, str):
            try:
                re.compile(self.feedforward_modules)
            except re.error as exc:
                raise ConfigError(f"feedforward_modules={self.feedforward_modules!r} is not a valid regular expression: {exc}") from None
        if isinstance(self.feedforward_modules, tuple) and isinstance(self.target_modules, tuple):
            # peft asks for a subset, which its own files fail (it saves "all-linear" as full module names);
            # here an entry only has to be able to name a target: one of the two ends the other
            stray = [e for e in self.feedforward_modules
                     if not any(t.endswith(e) or e.endswith(t) for t in self.target_modules)]
            if stray:
                raise ConfigError(
                    f"feedforward_modules must name targets; {stray} match no entry of target_modules="
                    f"{list(self.target_modules)}. Add them to target_modules or remove them from feedforward_modules"
                )
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in _NOT_IN_PEFT:
            out.pop(name)
        return out

    def is_feedforward(self, module_name: str, model: nn.Module) -> bool:
        """peft's rule: a regex must match the whole name; a list entry must end the name."""
        spec = self.feedforward_modules
        if spec is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in DEFAULT_FEEDFORWARD:
                raise ConfigError(
                    f"feedforward_modules is not set and IA3 has no default for model type {model_type!r}; set it, "
                    "e.g. feedforward_modules=['down_proj'], or feedforward_modules=[] to scale only outputs"
                )
            spec = DEFAULT_FEEDFORWARD[model_type]
        if isinstance(spec, str):
            return re.fullmatch(spec, module_name) is not None
        return any(module_name.endswith(entry) for entry in spec)


class IA3Linear(Delta):
    """l ⊙ output (l: (d_out, 1)) or input ⊙ l (l: (1, d_in), feedforward) on a Linear, Conv1D or 4-bit linear."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) in ("linear", "conv1d")

    def __init__(self, target: Target, config: IA3Config) -> None:
        super().__init__(target, config)
        d_out, d_in = target.weight.shape
        self.is_feedforward = config.is_feedforward(target.name, target.model)
        shape = (1, d_in) if self.is_feedforward else (d_out, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if config.init_ia3_weights else torch.randn(shape))

    @property
    def transforms_input(self) -> bool:  # type: ignore[override]
        return self.is_feedforward

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_feedforward:
            return x
        return (x.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(x.dtype)  # as peft: scaled in l's dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        if self.is_feedforward:
            return y
        return (y * self.ia3_l.flatten()).to(y.dtype)

    def merge(self, weight, bias):
        l = self.ia3_l.detach().float()  # (d_out, 1) or (1, d_in): broadcasts over W (d_out, d_in)
        merged = (weight.float() * l).to(weight.dtype)
        if self.is_feedforward or bias is None:
            return merged, bias
        return merged, (bias.float() * l.flatten()).to(bias.dtype)

    def unmerge(self, weight, bias):
        l = self.ia3_l.detach().float()
        restored = (weight.float() / l).to(weight.dtype)
        if self.is_feedforward or bias is None:
            return restored, bias
        return restored, (bias.float() / l.flatten()).to(bias.dtype)


register(IA3Config, IA3Linear, readers=("peft", "deltatune"))
