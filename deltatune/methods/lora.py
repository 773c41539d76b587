"""LoRA (Hu et al. 2021, arXiv:2106.09685) with rsLoRA scaling (Kalajdzievski 2023, arXiv:2312.03732).

            ┌──────────────┐
    x ──┬──►│  W0 (frozen) │──────────────────────────┐
        │   └──────────────┘                          ▼
        └──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► × s ──► (+) ──► h

    h = W0·x + s·B·A·dropout(x),  s = α/r  (or α/√r with use_rslora=True)

A starts kaiming-uniform (a=√5, i.e. U(±1/√d_in), as loralib and peft do; `init_lora_weights="gaussian"`
draws N(0, 1/r) instead), B starts at zero, so the adapted model equals the base at step 0. Embeddings are
the reverse (A = 0, B ~ N(0, 1)), as in peft. The site presents every base weight as (d_out, d_in), GPT-2's
Conv1D included, so ΔW = s·BA needs no transposing here. Parameter names and the file layout are peft's
(`lora_A`, `lora_B`, `lora_embedding_A`, `lora_embedding_B`). `bias` ("all", "lora_only") trains existing
biases in place, saved under their own names, as peft does. Variants (DoRA: `use_dora`) live in their own
files and are chosen by the core from the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range, pattern_value
from ..core.delta import Delta
from ..core.lowrank import LowRankFactors
from ..core.registry import register
from . import lora_eva, lora_init
from ..core.sites import Stage, Target, weight_kind

# peft LoraConfig keys for features deltatune does not implement, with the values that mean "off".
_PEFT_ONLY = {
    "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
    "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "lora_bias": False, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}

# peft's per-architecture defaults when target_modules is None (model.config.model_type).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",), "gpt2": ("c_attn",), "opt": ("q_proj", "v_proj"), "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",), "bert": ("query", "value"), "roberta": ("query", "value"),
    "t5": ("q", "v"), "bart": ("q_proj", "v_proj"),
}


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA settings; every field is the peft `LoraConfig` field of the same name and default.

    r: rank of the update (peft default 8). lora_alpha: α in s = α/r (default 8).
    lora_dropout: dropout on the LoRA branch's input only, in [0, 1).
    bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
    use_rslora: s = α/√r, which keeps the update's scale stable as r grows (rsLoRA).
    use_dora: the DoRA variant (weight-decomposed LoRA, deltatune.methods.dora), as peft spells it.
    fan_in_fan_out: the target stores W as [d_in, d_out] (GPT-2 Conv1D; detected from the layer, so ignored).
    init_lora_weights: True (kaiming-uniform A), "gaussian" (A ~ N(0, 1/r)) or False (A and B random:
        the adapter is not a no-op at start; for tests); "pissa", "pissa_niter_K", "olora", "loftq" (with
        loftq_config) and QPiSSA ("pissa" with loftq_config): deltatune.methods.lora_init.
    loftq_config: {"loftq_bits": 4, "loftq_iter": T} for LoftQ and QPiSSA (peft's LoftQConfig keys).
    eva_config: peft's EvaConfig fields for init_lora_weights="eva".
    rank_pattern / alpha_pattern: per-module r and α, keyed by a regex matched against the module name's end.
    """

    peft_type: ClassVar[str] = "LORA"
    recommended_lr: ClassVar[float] = 2e-4  # peft's and most recipes' default; the demo's 12 steps use 1e-3
    peft_only_defaults: ClassVar[Mapping[str, Any]] = _PEFT_ONLY
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS
    variant_flags: ClassVar[tuple[str, ...]] = ("use_dora",)
    file_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")  # after the adapted module's name

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    loftq_config: dict[str, int] = field(default_factory=dict)
    eva_config: dict[str, Any] | None = None

    def validate(self) -> None:
        check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        for key, alpha in [("lora_alpha", self.lora_alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not alpha > 0:  # a negative α flips the update's sign, 0 makes the adapter a no-op: both silent
                raise ConfigError(f"{key} must be positive (the scale is α/r), got {alpha!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        lora_init.validate(self)

    def describe(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        return {"variant": "DoRA (use_dora: weight-decomposed LoRA)" if self.use_dora else "LoRA",
                "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                "lora_dropout": self.lora_dropout, "bias": self.bias, **super().describe(tensors)}

    def readers(self, method_readers: tuple[str, ...]) -> tuple[str, ...]:
        # peft and vLLM would put LoftQ/QPiSSA factors on a base they were not trained with: the file holds the
        # recipe of the NF4 base, which only deltatune rebuilds (methods/lora_init.py)
        return ("deltatune",) if lora_init.quantizes_base(self) else method_readers

    def rank_and_scale(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, module_name, self.r)
        alpha = pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


class LoraLinear(Delta):
    """ΔW = s·B·A on nn.Linear, GPT-2 Conv1D or a quantized linear (read through the site's BaseWeight)."""

    lr_roles = {"lora_B": "lora_B"}  # LoRA+ trains B at a larger learning rate
    additive = True  # two additive deltas commute, so either may be merged alone

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) in ("linear", "conv1d")

    def __init__(self, target: Target, config: LoraConfig) -> None:
        super().__init__(target, config)
        r, self.scaling = config.rank_and_scale(target.name)
        d_out, d_in = target.weight.shape
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        self.register_buffer("init_A", None, persistent=False)  # 16-bit PiSSA/OLoRA: the frozen A0, B0 (lora_init)
        self.register_buffer("init_B", None, persistent=False)
        if config.init_lora_weights is False:
            return
        if lora_init.is_special(config):
            lora_init.initialise(self, target, config)
            return
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·dropout(x) in the adapter's dtype (in autocast's, where it is on)."""
        if not (isinstance(self.lora_dropout, nn.Identity) and torch.is_autocast_enabled(x.device.type)):
            # under autocast the matmuls cast x themselves: widening a bf16 input (o_proj's, down_proj's) to an
            # fp32 adapter's dtype first would only be cast back, a round trip of copies each way (2.5% of a
            # bf16 SFT step), with the same values
            x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        # s scales the (tokens, r) intermediate, not the (tokens, d_out) output: the same product, measured
        # 5-25% faster per layer for a training step (bench/lora_layer_micro.py)
        out = self.lora_B(self.lora_A(x) * self.scaling)
        if self.init_A is not None:  # PiSSA/OLoRA on the unchanged W: s·(BA − B0A0)·x (lora_init)
            out = out - F.linear(F.linear(x, self.init_A) * self.scaling, self.init_B)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        return y + self.lora_output(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        product = self.lora_B.weight @ self.lora_A.weight
        if self.init_A is not None:
            product = product - self.init_B @ self.init_A
        return product * self.scaling  # (d_out, d_in)

    def low_rank_factors(self) -> LowRankFactors:
        """(A, B, s): the low-rank view the serving kernel and LoRA exports read (deltatune.core.lowrank); with
        PiSSA/OLoRA's initial factors the rank-2r form [A; A0], [B, −B0] (lora_init)."""
        if self.init_A is not None:
            return LowRankFactors(torch.cat([self.lora_A.weight, self.init_A]),
                                  torch.cat([self.lora_B.weight, -self.init_B], dim=1), float(self.scaling))
        return LowRankFactors(self.lora_A.weight, self.lora_B.weight, float(self.scaling))

    def merge(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.delta_weight().to(weight.dtype), bias


class LoraEmbedding(Delta):
    """LoRA on nn.Embedding: ΔE = s·(B A)ᵀ, looked up row-wise, with A = 0 and B ~ N(0, 1) at start."""

    lr_roles = {"lora_embedding_": "lora_embedding"}
    additive = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) == "embedding"

    def __init__(self, target: Target, config: LoraConfig) -> None:
        super().__init__(target, config)
        r, self.scaling = config.rank_and_scale(target.name)
        num, dim = target.weight.shape
        base = target.module
        self.lookup = dict(padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        A = torch.zeros(r, num)  # (r, num_embeddings)
        if config.init_lora_weights is False:
            nn.init.normal_(A)
        self.lora_embedding_A = nn.Parameter(A)
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, r))  # (embedding_dim, r)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        after_A = F.embedding(x, self.lora_embedding_A.T, **self.lookup)
        return y + ((after_A @ self.lora_embedding_B.T) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling  # (num, dim)

    def merge(self, weight, bias):
        return weight + self.delta_weight().to(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.delta_weight().to(weight.dtype), bias


def trained_biases(model: nn.Module, config: LoraConfig, sites: Sequence[str]) -> list[str]:
    """LoRA's `bias` option: the existing biases it trains in place ("all": every one; "lora_only": the adapted layers')."""
    if config.bias == "all":
        return [n for n, _ in model.named_parameters() if n.split(".")[-1] == "bias"
                and ".modules_to_save." not in n and ".original_module." not in n]
    if config.bias == "lora_only":
        return [f"{p}.base_layer.bias" for p in sites if getattr(model.get_submodule(p).base_layer, "bias", None) is not None]
    return []


register(LoraConfig, LoraLinear, LoraEmbedding, select=trained_biases, readers=("peft", "vLLM", "deltatune"),
         resolve=lora_init.prepare_base, save_view=lora_init.save_view, prepass=lora_eva.eva_prepass)
