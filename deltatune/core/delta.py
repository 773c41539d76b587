"""A delta: one adapter's change at one site of the model. Every weight- or block-attached method is a Delta.

A site (`deltatune.core.sites`) holds the frozen base module and an ordered stack of deltas, one per adapter.
Each delta turns the function computed so far, F, into a new one, F':

    LoRA          F'(x) = F(x) + s·B·A·x                       forward(x, y) = y + s·B·A·x
    IA3 (output)  F'(x) = l ⊙ F(x)                            forward(x, y) = l ⊙ y
    IA3 (input)   F'(x) = F(l ⊙ x)                            transform_input(x) = l ⊙ x
    Houlsby       F'(x) = F(x) + up(φ(down(F(x))))            forward(x, y) = y + up(φ(down(y)))

so deltas stacked on one site apply in the order they were attached, and merging the stack (each delta's
`merge` applied to the affine map (W, b) in the same order) gives exactly its forward. The delta sees the base
weight only through `deltatune.core.sites.BaseWeight` (shape, dtype, dequantized value), never through
`base_layer.weight`, so a 4-bit base needs nothing from the methods.

A delta's tensors for the adapter file are its `tensors()`: by default its own state dict (parameters and
persistent buffers), keyed relative to the site, e.g. `lora_A.weight` -> `<site>.lora_A.weight` on disk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from .sites import Stage, Target


class NotMergeableError(TypeError):
    """An adapter whose method cannot fold into the base weights (e.g. a bottleneck adapter)."""


class Delta(nn.Module):
    """Base class of every site-attached method. Subclasses override what their method needs.

    site: "weight" (the delta reads/merges the base weight of a Linear, Conv1D or Embedding) or "block"
        (the delta wraps any module's forward: keyword arguments pass through, a tuple output has its first
        element changed).
    mergeable: whether `merge`/`unmerge` fold the delta into (W, b).
    transforms_input: whether `transform_input` changes what the earlier stack (and the base) receives.
    lr_roles: optimizer roles of this delta's parameters, by key prefix in `tensors()` (LoRA+ gives
        "lora_B" a larger learning rate; the training loop asks for roles, never for names).
    """

    site: ClassVar[str] = "weight"
    mergeable: ClassVar[bool] = True
    transforms_input: ClassVar[bool] = False
    lr_roles: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this delta class can be placed on `module` (the unwrapped base module)."""
        raise NotImplementedError

    def __init__(self, target: "Target", config: Any) -> None:
        super().__init__()

    # ---- forward ------------------------------------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: "Stage") -> torch.Tensor:  # type: ignore[override]
        """The output with this delta applied: `x` is the input this delta sees, `y` the output so far."""
        return y

    # ---- merging into the affine map (W, b) of a weight site -----------------------------------------
    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') such that F'(x) = W'x + b' when F(x) = Wx + b. W in PyTorch's (out, in) layout."""
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of `merge` (up to floating-point rounding)."""
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged")

    # ---- the file ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Key relative to the site -> live tensor, as written to the adapter file."""
        return dict(self.state_dict(keep_vars=True))
