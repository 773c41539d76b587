"""LoRA (Hu et al. 2021, arXiv:2106.09685) with rsLoRA scaling (Kalajdzievski 2023, arXiv:2312.03732).

            ┌──────────────┐
    x ──┬──►│  W0 (frozen) │──────────────────────────┐
        │   └──────────────┘                          ▼
        └──► dropout ──► A (r × d_in) ──► B (d_out × r) ──► × s ──► (+) ──► h

    h = W0·x + s·B·A·dropout(x),  s = α/r  (or α/√r with use_rslora=True)

A starts kaiming-uniform (a=√5, i.e. U(±1/√d_in), as loralib and peft do; `init_lora_weights="gaussian"`
draws N(0, 1/r) instead), B starts at zero, so the adapted model equals the base at step 0. Embeddings are
the reverse (A = 0, B ~ N(0, 1)), as in peft. GPT-2's Conv1D stores W transposed (fan_in_fan_out), so its
ΔW is transposed before merging. Parameter names and the file layout are peft's (`lora_A`, `lora_B`,
`lora_embedding_A`, `lora_embedding_B`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import AdapterConfig, ConfigError, check_positive_int, check_range, pattern_value
from ..core.layer import AdapterLayer
from ..core.registry import register
from ..core.targets import Conv1D, LINEAR_TYPES

# peft LoraConfig keys for features deltatune does not implement, with the values that mean "off".
_PEFT_ONLY = {
    "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
    "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None, "use_dora": False,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
    "monteclora_config": None, "layer_replication": None, "lora_bias": False, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA settings; every field is the peft `LoraConfig` field of the same name and default.

    r: rank of the update (peft default 8). lora_alpha: α in s = α/r (default 8).
    lora_dropout: dropout on the LoRA branch's input only, in [0, 1).
    bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
    use_rslora: s = α/√r, which keeps the update's scale stable as r grows (rsLoRA).
    fan_in_fan_out: the target stores W as [d_in, d_out] (GPT-2 Conv1D; detected automatically).
    init_lora_weights: True (kaiming-uniform A), "gaussian" (A ~ N(0, 1/r)) or False (A and B random:
        the adapter is not a no-op at start; for tests).
    rank_pattern / alpha_pattern: per-module r and α, keyed by a regex matched against the module name's end.
    """

    peft_type: ClassVar[str] = "LORA"
    peft_only_defaults: ClassVar[Mapping[str, Any]] = _PEFT_ONLY

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")

    def rank_and_scale(self, module_name: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, module_name, self.r)
        alpha = pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


class _LoraBase(AdapterLayer):
    """What LoRA layers share: per-adapter rank, scale and dropout."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()

    def per_adapter_state(self) -> list[Any]:
        return [self.r, self.scaling, self.lora_dropout]

    def _add_common(self, name: str, config: LoraConfig, module_name: str) -> int:
        r, self.scaling[name] = config.rank_and_scale(module_name)
        self.r[name] = r
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        return r


class LoraLinear(_LoraBase):
    """LoRA on nn.Linear or GPT-2 Conv1D."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.fan_in_fan_out = isinstance(Conv1D, type) and isinstance(base_layer, Conv1D)
        d_in, d_out = base_layer.weight.shape if self.fan_in_fan_out else base_layer.weight.shape[::-1]
        self.in_features, self.out_features = d_in, d_out

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, LINEAR_TYPES)

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        r = self._add_common(name, config, module_name)
        # fan_in_fan_out follows the layer type (Conv1D: yes, Linear: no) as in peft, whatever the config says:
        # a transposed delta on a square nn.Linear would merge a wrong weight without any shape error.
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        if config.init_lora_weights is False:
            return
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_A.weight.dtype))
        # s scales the (tokens, r) intermediate, not the (tokens, d_out) output: the same product, measured
        # 5-25% faster per layer for a training step (bench/lora_layer_micro.py)
        return result + lora_B(lora_A(x) * self.scaling[name]).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (d_out, d_in)
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)


class LoraEmbedding(_LoraBase):
    """LoRA on nn.Embedding: ΔE = s·(B A)ᵀ, looked up row-wise, with A = 0 and B ~ N(0, 1) at start."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        r = self._add_common(name, config, module_name)
        num, dim = self.base_layer.weight.shape
        A = torch.zeros(r, num)  # (r, num_embeddings)
        B = torch.randn(dim, r)  # (embedding_dim, r)
        if config.init_lora_weights is False:
            nn.init.normal_(A)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        after_A = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return result + ((after_A @ B.T) * self.scaling[name]).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]  # (num, dim)
        return delta.to(self.base_layer.weight.dtype)


register(LoraConfig, LoraLinear, LoraEmbedding)
