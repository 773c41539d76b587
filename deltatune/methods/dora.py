"""DoRA: weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353), the `use_dora` variant of LoRA.

The adapted weight is split into a magnitude m (one per output row, trained) and a direction (W + s·B·A, with
LoRA's A and B trained), re-normalised row by row (paper Eq. 5; the paper's "column-wise" norm is per output
feature, i.e. per row of PyTorch's (d_out, d_in) weight):

    W' = m ⊙ (W + s·B·A) / n,        n = ‖W + s·B·A‖ per row, shape (d_out,)

    h = W'x + b = g ⊙ (Wx + s·B·A·x) + b,      g = m / n

n is treated as a constant (detached; paper §4.3), and the bias is not rescaled. m starts at n (the row norms
of W when B = 0), so the adapted model equals the base at step 0. W and b are the affine map of the stack
before this delta (`Stage.weight_and_bias()`): the base alone, dequantized for a 4-bit base, or the base with
the earlier deltas of the site folded in, so DoRA stacked on another adapter is exactly its merged form.

How it is computed (peft 0.21 computes the same h as y + (g − 1) ⊙ (Wx) + g ⊙ s·B·A·x):
- n without forming W + s·B·A: ‖W + sΔ‖² = ‖W‖² + 2s·rowdot(W, BA) + s²·‖BA‖², with ‖W‖² of the frozen base
  cached, rowdot(W, BA) = rowsum(B ⊙ W·Aᵀ) (one (d_out, r) product) and ‖BA‖² = rowsum((B·AAᵀ) ⊙ B). n is
  cached too, keyed on the versions of A, B and the base tensors, so serving computes it once.
- the output y + (g − 1) ⊙ (y − b) + u·(g ⊙ B)ᵀ, u = s·A·x, in one autograd node: one elementwise pass and the
  rank-r product accumulated in place, as many passes over (tokens, d_out) as LoRA's y + B·u. It saves its own
  output (which the next layer usually keeps anyway), not y, and recovers what m's gradient needs from it.
  (g − 1) is small, so it keeps its precision in bf16, where g itself would round to 1 ± 0.4%.
- with lora_dropout active in training the correction uses W·dropout(x), as peft and the paper's code do
  (one more matmul per layer): h = y + (g − 1) ⊙ W·drop(x) + g ⊙ s·B·A·drop(x).

File: peft's LoRA file with `use_dora: true`, the magnitude stored as `<module>.lora_magnitude_vector`
(shape (d_out,), no `.weight` suffix), exactly as peft writes it. Merging caches n, which unmerge needs:
W = W'·n/m − s·BA.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import register_variant
from ..core.sites import Stage, Target
from .lora import LoraConfig, LoraLinear


def _versions(tensors: Iterable[torch.Tensor]) -> tuple:
    """A key that changes whenever one of `tensors` is replaced or written in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class _DoraOutput(torch.autograd.Function):
    """out = g ⊙ (y − b) + b + u·(g ⊙ B)ᵀ, with u = s·A·x (tokens, r): DoRA's output from the stack's output y.

    Forward: out = y + (g − 1) ⊙ (y − b), then the rank-r product accumulates into it (addmm_): no more passes
    over (tokens, d_out) than LoRA's y + B·u. Saves its output, not y: m's gradient needs Σ_t grad ⊙ (y − b),
    and g ⊙ (y − b) = out − b − u·(g ⊙ B)ᵀ, whose last term sums to rowsum(B ⊙ gradᵀu) and cancels.
    """

    @staticmethod
    def forward(ctx, y, u, B, g, bias):  # type: ignore[override]
        d_out, r = B.shape
        y2, u2 = y.reshape(-1, d_out), u.reshape(-1, r).to(y.dtype)  # (tokens, d_out), (tokens, r)
        gB = (g[:, None] * B).to(y.dtype)  # (d_out, r)
        out = torch.addcmul(y2, y2 if bias is None else y2 - bias.to(y.dtype), (g - 1).to(y.dtype))
        out.addmm_(u2, gB.T)
        ctx.save_for_backward(out, u2, B, g, gB, bias)
        ctx.shapes = (y.shape, u.shape, u.dtype)
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out, u2, B, g, gB, bias = ctx.saved_tensors
        y_shape, u_shape, u_dtype = ctx.shapes
        grad2 = grad.reshape(-1, B.shape[0]).to(out.dtype)
        grad_y = grad_u = grad_B = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_y = grad2.addcmul(grad2, (g - 1).to(grad2.dtype)).view(y_shape)  # g ⊙ grad
        if ctx.needs_input_grad[1]:
            grad_u = (grad2 @ gB).view(u_shape).to(u_dtype)
        if ctx.needs_input_grad[2]:
            grad_B = ((grad2.T @ u2).float() * g[:, None]).to(B.dtype)
        if ctx.needs_input_grad[3]:  # Σ_t grad ⊙ (y − b) = (Σ_t grad ⊙ out − b ⊙ Σ_t grad) / g
            dot = (grad2 * out).sum(0).float()  # summed in bf16 with fp32 accumulation: no fp32 copy first
            if bias is not None:
                dot = dot - bias.float() * grad2.sum(0).float()
            grad_g = (dot / g).to(g.dtype)
        return grad_y, grad_u, grad_B, grad_g, None


class DoraLinear(LoraLinear):
    """LoRA's A and B plus a trained magnitude per output row (`lora_magnitude_vector`, shape (d_out,))."""

    additive = False  # rescales the whole row: does not commute with the deltas below it

    def __init__(self, target: Target, config: LoraConfig) -> None:
        super().__init__(target, config)
        self._norm_cache: dict[str, tuple[tuple, Any]] = {}  # not state: recomputed when its key changes
        self._merged_norm: torch.Tensor | None = None  # n of the last merge, for unmerge
        with torch.no_grad():  # m = ‖W + s·BA‖ (= ‖W‖ while B = 0), so the model starts unchanged
            weight = target.weight.value()
            magnitude = self.row_norm(weight, self._squared_rows(weight))
        self.lora_magnitude_vector = nn.Parameter(magnitude)

    # ---- n = ‖W + s·B·A‖ per row, without the (d_out, d_in) sum -----------------------------------------
    @staticmethod
    def _squared_rows(weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()  # (d_out,)

    def row_norm(self, weight: torch.Tensor, squared_rows: torch.Tensor) -> torch.Tensor:
        """n (fp32, (d_out,)) for W = `weight` with ‖W‖² per row = `squared_rows`; no gradient."""
        A, B, s = self.lora_A.weight.detach(), self.lora_B.weight.detach(), self.scaling
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            wa = F.linear(A.to(weight.dtype), weight).float()  # (r, d_out) = A·Wᵀ
            Bf, Af = B.float(), A.float()
            # rowdot(W, BA) = rowsum(B ⊙ W·Aᵀ) and ‖BA‖² = rowsum(B ⊙ B·AAᵀ), both in one (d_out, r) product
            both = torch.addmm(wa.T, Bf, Af @ Af.T, beta=2 * s, alpha=s * s)
            return (squared_rows + torch.linalg.vecdot(Bf, both)).clamp_min(0).sqrt()

    def _cached(self, slot: str, key: tuple, compute) -> Any:
        hit = self._norm_cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._norm_cache[slot] = (key, value)
        return value

    def norm_and_bias(self, stage: Stage) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, b) of the stack before this delta; cached while A, B and every tensor below are unchanged."""
        base = stage.site.base_weight
        below = [*base.module.parameters(), *base.module.buffers()]
        for delta in stage.before:  # a stacked stage: W and b depend on the earlier deltas too
            below += [*delta.parameters(), *delta.buffers()]
        lora = (self.lora_A.weight, self.lora_B.weight)

        def compute() -> tuple[torch.Tensor, torch.Tensor | None]:
            weight, bias = stage.weight_and_bias()
            if stage.before:
                squared = self._squared_rows(weight)
            else:  # the frozen base: ‖W‖² changes only when the base does
                squared = self._cached("squared_rows", _versions(below), lambda: self._squared_rows(weight))
            return self.row_norm(weight, squared), bias

        return self._cached("norm", _versions([*lora, *below]), compute)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        norm, bias = self.norm_and_bias(stage)
        g = self.lora_magnitude_vector.float() / norm  # (d_out,); gradient to m only
        if self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0:
            return self._forward_dropout(x, y, stage, g)
        u = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))) * self.scaling  # (..., r)
        return _DoraOutput.apply(y, u, self.lora_B.weight, g, bias)

    def _forward_dropout(self, x: torch.Tensor, y: torch.Tensor, stage: Stage, g: torch.Tensor) -> torch.Tensor:
        """peft's training path with dropout: y + (g − 1) ⊙ W·drop(x) + g ⊙ s·B·A·drop(x)."""
        weight, _ = stage.weight_and_bias()
        dropped = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(dropped) * self.scaling)
        base = F.linear(dropped.to(weight.dtype), weight)
        return (y + (g - 1) * base + g * lora).to(y.dtype)

    # ---- merging ------------------------------------------------------------------------------------
    def merge(self, weight, bias):
        norm = self.row_norm(weight, self._squared_rows(weight))
        self._merged_norm = norm
        g = self.lora_magnitude_vector.detach().float() / norm
        merged = g[:, None] * (weight.float() + self.delta_weight().detach().float())
        return merged.to(weight.dtype), bias

    def unmerge(self, weight, bias):
        if self._merged_norm is None:
            raise RuntimeError("this DoRA delta was never merged, so there is nothing to unmerge")
        g = self.lora_magnitude_vector.detach().float() / self._merged_norm.to(weight.device)
        restored = weight.float() / g[:, None] - self.delta_weight().detach().float()
        return restored.to(weight.dtype), bias


register_variant("LORA", "use_dora", DoraLinear, readers=("peft", "deltatune"))  # vLLM serves no DoRA
