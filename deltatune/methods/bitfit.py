"""BitFit (Ben Zaken et al. 2021, arXiv:2106.10199): train the bias terms only (`peft_type: "BITFIT"`).

    y = W·x + b,   W frozen, b trained                       (existing biases, the paper's method)
    y = W·x + (b + Δb),   Δb = 0 at start, W and b frozen    (add_biases=True, docs/methods.md, BitFit: option (a))

On BERT the paper trains every bias (Q/K/V, attention output, both FFN linears, the LayerNorms), ~0.08% of the
parameters, plus the task head (here `modules_to_save=["classifier"]`). The existing biases are trained in
place through the core's selection mechanism: originals are snapshotted and restored exactly by
`disable_adapters`, `delete_adapter` and whenever the adapter is inactive; the file holds those bias tensors
under their own names and nothing else.

Llama, Mistral and Gemma have no biases, so plain BitFit would train nothing. `add_biases` decides, at
attach, from the model (`resolve`): left unset (None), BitFit trains the existing biases of the target modules
if there are any (BERT; Qwen2's q/k/v biases, docs/methods.md, BitFit: option (c)) and otherwise warns and uses option
(a): a zero-initialised bias Δb on each target Linear, a weight-site delta. The model equals the base at start,
Δb merges into the layer's bias (creating it where there was none), and it works in mixed batches. Existing
biases stay frozen in that mode (training Δb on top of b is the same as training b). The adapter keeps and
saves the resolved value, so the file records which BitFit it is; `add_biases=False` on a model without biases
is an error naming the option, never a run that trains nothing.

peft has no BitFit, so the file is peft's two files with `peft_type: "BITFIT"`, which peft refuses to load;
only deltatune reads it.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError
from ..core.delta import Delta
from ..core.registry import register, register_variant
from ..core.sites import Stage, Target, weight_kind
from .full import base_parameters, parameters_in_targets

log = logging.getLogger(__name__)

_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Where add_biases=True puts its biases when target_modules is None: every Linear of the decoder layers.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LINEARS, "mistral": _LLAMA_LINEARS, "qwen2": _LLAMA_LINEARS, "gemma": _LLAMA_LINEARS,
    "gemma2": _LLAMA_LINEARS, "qwen3": _LLAMA_LINEARS,
}


@dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    """BitFit: bias terms only.

    target_modules: None (default) trains every bias of the model; otherwise the biases inside the matching
        modules (e.g. ["query", "intermediate.dense"], the paper's 0.04% variant on BERT).
    add_biases: None (default): decided at attach: False if the target modules hold biases, else True, with a
        warning; the adapter records the result. False: train the existing biases (a model with none is an
        error). True: add a zero-initialised bias to each target Linear (target_modules None: every decoder
        Linear of llama, mistral, qwen2/3, gemma/2) and train those; mergeable (docs/methods.md, BitFit: option (a)).

    Recommended learning rate: 1e-4 to 1e-3 (the paper sweeps 1e-4..1e-3 on GLUE); biases move little per
    step, so BitFit wants 10-100× full fine-tuning's learning rate.
    """

    peft_type: ClassVar[str] = "BITFIT"
    recommended_lr: ClassVar[float] = 1e-3  # BitFit paper: 1e-4 to 1e-3; biases need the high end
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = DEFAULT_TARGETS
    variant_flags: ClassVar[tuple[str, ...]] = ("add_biases",)

    add_biases: bool | None = None

    def validate(self) -> None:
        if not (self.add_biases is None or isinstance(self.add_biases, bool)):
            raise ConfigError(f"add_biases must be true, false or null (decided at attach), got {self.add_biases!r}")


def _is_bias(name: str) -> bool:
    return name.rpartition(".")[2] == "bias"


def resolve(model: nn.Module, config: BitFitConfig) -> BitFitConfig:
    """add_biases=None made definite for this model: the existing biases if the targets hold any, else added ones."""
    if config.add_biases is not None:
        return config
    if parameters_in_targets(model, config, _is_bias):
        return config.replace(add_biases=False)
    warnings.warn(
        f"BITFIT: {type(model).__name__} has no biases in the target modules, so BitFit adds zero-initialised "
        "biases to the target Linears and trains those (docs/methods.md, BitFit: option (a); mergeable); the adapter records "
        "add_biases=True. Set add_biases explicitly to silence this", stacklevel=3,
    )
    return config.replace(add_biases=True)


def existing_biases(model: nn.Module, config: BitFitConfig, sites: Sequence[str]) -> list[str]:
    """The existing biases BitFit trains in place; none with add_biases=True (its deltas are the biases)."""
    if config.add_biases:  # the added biases are this adapter's deltas
        log.info("BITFIT: training zero-initialised biases added to %d Linear layers (add_biases=True, docs/methods.md, "
                 "BitFit: option (a)); the model's existing biases stay frozen", len(sites))
        return []
    if not any(_is_bias(name) for name in base_parameters(model)):
        raise ConfigError(
            f"add_biases=False, but {type(model).__name__} has no bias parameters (Llama, Mistral and Gemma have "
            "none), so BitFit would train nothing. Set add_biases=True (CLI: --adapter.add_biases true) to add "
            "zero-initialised biases to the target Linears and train those (docs/methods.md, BitFit: option (a); mergeable)"
        )
    names = parameters_in_targets(model, config, _is_bias)
    if not names:
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches modules without biases, so BitFit would train nothing; "
            "name modules that have biases, or set add_biases=True to add them"
        )
    return names


class AddedBias(Delta):
    """y + Δb on a Linear or Conv1D, Δb = 0 at start; merges into the layer's bias (created if absent)."""

    additive = True  # commutes with other additive deltas (LoRA), so either merges alone

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) in ("linear", "conv1d")

    def __init__(self, target: Target, config: BitFitConfig) -> None:
        super().__init__(target, config)
        self.added_bias = nn.Parameter(torch.zeros(target.weight.shape[0]))  # (d_out,)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        return y + self.added_bias.to(y.dtype)

    def merge(self, weight, bias):
        delta = self.added_bias.detach().to(weight.dtype)
        return weight, delta.clone() if bias is None else bias + delta

    def unmerge(self, weight, bias):
        return weight, None if bias is None else bias - self.added_bias.detach().to(bias.dtype)


register(BitFitConfig, select=existing_biases, resolve=resolve, readers=("deltatune",))
register_variant("BITFIT", "add_biases", AddedBias)
