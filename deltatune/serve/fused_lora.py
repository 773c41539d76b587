"""Many plain LoRA adapters in one batch: every row gets its own adapter's sᵢ·Bᵢ·Aᵢ·x, in a few ops per site.

For the adapters a batch uses at a site (ranks r₁…rₖ, no padding between them) two kernels read the factors:

- **stacked** (decode, one token per row): A_cat = [A₁; …; Aₖ] (Σr, d_in), B_cat = [B₁ … Bₖ] (d_out, Σr), and

      y_b += B_cat · (m_b ⊙ A_cat·x_b)        m_b = sᵢ on the block of row b's adapter i, 0 elsewhere

  two matmuls whatever the number of adapters; the other blocks add exact zeros, so row b gets exactly
  sᵢBᵢAᵢx_b. Each token pays Σr instead of rᵢ, cheap for one token per row, not for a prompt.
- **gathered** (prefill, many tokens per row; Punica's BGMV): each row's own Aᵢ, Bᵢ gathered, one batched
  matmul per distinct rank, so a token pays only its own rᵢ.

Decode computes in fp32 (as peft keeps adapters; on this CPU a bf16 `(rows, 8) @ (8, 576)` product with few
rows took 2-18 ms against 20-40 µs in fp32); prefill computes in the base's dtype (bf16 there is 3x faster
than casting a prompt's activations to fp32 and back). On an fp32 base both are exact fp32. Under autocast
(an fp32 base run in bf16, as `deltatune eval` does) the kernels run outside it, in the same dtypes as on a
bf16 base: autocast would turn the decode product into that slow bf16 one.

Measured (bench/bench_serve.py, docs/serving.md): the core's routed path, one small product per adapter per
site, made 32 adapters of rank 8 cost about half the base's throughput; these kernels keep most of it.

Stacks are built once per set of adapters and cached (a few sets, least recently used); a batch whose adapters
are a subset of a cached set reuses it. The kernels read factors through the low-rank view
(`deltatune.core.lowrank.low_rank_factors`: (A, B, s)), so any adapter made of low-rank deltas on linear layers
(LoRA, DyLoRA at its rank, VeRA, AdaLoRA) is served here; the others (DoRA, IA3, LoHa, bottleneck, prompt
tuning) are left to `deltatune.route` in the same forward.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
from torch import nn

from ..core.adapter import resolve
from ..core.model import adapters as attached_adapters
from ..core.lowrank import LowRankFactors, low_rank_factors
from ..core.sites import weight_kind


class _SiteStack:
    """One site's factors for a set of adapters, in the layouts of the two kernels."""

    def __init__(self, site: nn.Module, parts: list[tuple[int, LowRankFactors]], count: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.site = site
        rank = lambda d: d.A.shape[0]  # noqa: E731
        # sites with the same key share per-forward row data (masks, row selections)
        self.key = tuple((i, rank(d), float(d.scale)) for i, d in parts)
        f32 = dict(dtype=torch.float32, device=device)
        # stacked (decode): A_cat (d_in, Σr), B_cat (Σr, d_out); owner and scale of each of the Σr columns
        self.A = torch.cat([d.A for _, d in parts]).to(**f32).T.contiguous()
        self.B = torch.cat([d.B for _, d in parts], dim=1).to(**f32).T.contiguous()
        self.owner = torch.cat([torch.full((rank(d),), i, device=device) for i, d in parts])
        self.scale = torch.cat([torch.full((rank(d),), float(d.scale), **f32) for _, d in parts])
        # gathered (prefill), one group per rank: At (k, d_in, r), Bt (k, r, d_out), scales (k,), and each
        # adapter's index in its group (-1: not in the group); in the base's dtype: with many tokens per row a
        # bf16 product is 3x faster than casting the activations to fp32 and back
        self.groups = []
        act = dict(dtype=dtype, device=device)
        for r in sorted({rank(d) for _, d in parts}):
            members = [(i, d) for i, d in parts if rank(d) == r]
            local = torch.full((count,), -1, dtype=torch.long, device=device)
            local[[i for i, _ in members]] = torch.arange(len(members), device=device)
            self.groups.append((
                torch.stack([d.A.T for _, d in members]).to(**act).contiguous(),
                torch.stack([d.B.T for _, d in members]).to(**act).contiguous(),
                torch.tensor([float(d.scale) for _, d in members], **act), local, r))


class _Stack:
    """The factors of a set of adapters at every site any of them targets."""

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype | None) -> None:
        self.adapters = [attached_adapters(model)[n] for n in names]  # held: a stack is valid for these objects only
        self.index = {n: i for i, n in enumerate(names)}
        by_site: dict[str, list[tuple[int, LowRankFactors]]] = {}
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():
            for i, adapter in enumerate(self.adapters):
                for path, delta in adapter.deltas(model):
                    by_site.setdefault(path, []).append((i, low_rank_factors(delta)))
            self.sites = [_SiteStack(model.get_submodule(resolve(model, p)), parts, len(names), embeddings.device,
                                     dtype or embeddings.dtype)
                          for p, parts in by_site.items()]


class _Kernel:
    """The forward hook of one site for one forward: adds each row's own sᵢBᵢAᵢx to the site's output."""

    def __init__(self, stack: _SiteStack, rows: torch.Tensor, shared: dict) -> None:
        self.stack, self.rows, self.shared = stack, rows, shared  # rows: (B,) adapter index, -1 for none

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (B, T, d_in)
        with torch.autocast(x.device.type, enabled=False):
            if x.dim() == 3 and x.shape[1] > 1:
                return self._gathered(x, output)
            return self._stacked(x, output)

    def _stacked(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Few tokens per row (decode): two matmuls over all the adapters' columns, masked per row."""
        st = self.stack
        mask = self._shared("mask", lambda: torch.where(self.rows[:, None] == st.owner[None, :], st.scale, 0.0))
        h = torch.matmul(x.to(st.A.dtype), st.A)  # (B, T, Σr)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return output.add_(torch.matmul(h, st.B).to(output.dtype))

    def _gathered(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Many tokens per row (prefill): each row's own factors gathered, one batched matmul per rank; the
        stacked product would multiply every token by every adapter's columns."""
        for g, (At, Bt, scales, local, r) in enumerate(self.stack.groups):
            sel, ids = self._shared(("group", g), lambda: _selection(local[self.rows.clamp(min=0)], self.rows))
            if ids.numel() == 0:
                continue
            xs = x if sel is None else x.index_select(0, sel)
            h = torch.bmm(xs.to(At.dtype), At.index_select(0, ids)) * scales.index_select(0, ids)[:, None, None]
            out = torch.bmm(h, Bt.index_select(0, ids)).to(output.dtype)  # (rows, T, d_out)
            if sel is None:
                output.add_(out)
            else:
                output.index_add_(0, sel, out)
        return output

    def _shared(self, name, make):
        key = (self.stack.key, name)
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


def _selection(local: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(positions of the rows in a rank group, None when that is every row; their indices in the group)."""
    member = (local >= 0) & (rows >= 0)
    if bool(member.all()):
        return None, local
    sel = member.nonzero().flatten()
    return sel, local.index_select(0, sel)


def _linear_low_rank(model: nn.Module, path: str, delta: nn.Module) -> bool:
    """A low-rank delta on a linear layer (the kernels multiply the site's input features: no embedding lookups)."""
    site = model.get_submodule(resolve(model, path))
    return weight_kind(getattr(site, "base_layer", site)) in ("linear", "conv1d") and low_rank_factors(delta) is not None


class FusedLora:
    """dtype: of the sites' activations when it is not the base's (the autocast dtype), for the prefill kernel."""

    def __init__(self, model: nn.Module, max_sets: int = 4, dtype: torch.dtype | None = None) -> None:
        self.model, self.dtype = model, dtype
        self.max_sets = max_sets
        self._stacks: OrderedDict[tuple, _Stack] = OrderedDict()
        self._eligible: dict[str, tuple[object, bool]] = {}

    def eligible(self, name: str) -> bool:
        """Every delta a low-rank product (deltatune.core.lowrank: LoRA, DyLoRA at its rank, VeRA, AdaLoRA, ...)
        on linear layers, without modules_to_save or trained biases (dropout is off: the engine runs the model
        in eval mode)."""
        adapter = attached_adapters(self.model)[name]
        cached = self._eligible.get(name)
        if cached is not None and cached[0] is adapter:
            return cached[1]
        deltas = [d for _, d in adapter.deltas(self.model)]
        part = adapter.part(self.model)  # one holding only frozen buffers (VeRA's projections) changes no row itself
        trained_part = part is not None and any(True for _ in part.parameters())
        ok = bool(deltas) and not (adapter.saved or adapter.selected or trained_part) and all(
            _linear_low_rank(self.model, path, d) for path, d in adapter.deltas(self.model))
        self._eligible[name] = (adapter, ok)
        return ok

    @contextlib.contextmanager
    def apply(self, names: Sequence[str | None]) -> Iterator[list[str | None]]:
        """Inside the block, the sites add the stacked LoRA of the eligible adapters of `names` (one per row);
        yields the names left for `deltatune.route` (None where this block handles the row)."""
        fused = {n for n in names if n is not None and self.eligible(n)}
        if not fused:
            yield list(names)
            return
        stack = self._stack(sorted(fused))
        device = next(self.model.parameters()).device
        rows = torch.tensor([stack.index[n] if n in fused else -1 for n in names], device=device)
        shared: dict = {}  # per-forward row data, shared by the sites with the same adapters and ranks
        handles = [site.site.register_forward_hook(_Kernel(site, rows, shared)) for site in stack.sites]
        try:
            yield [None if n in fused else n for n in names]
        finally:
            for handle in handles:
                handle.remove()

    def _stack(self, names: list[str]) -> _Stack:
        """A cached stack holding `names` (the same adapter objects, not merely the same names), else a new one."""
        attached = attached_adapters(self.model)
        current = lambda stack: all(attached.get(n) is stack.adapters[i] for n, i in stack.index.items())  # noqa: E731
        for key, stack in reversed(self._stacks.items()):  # a superset at most twice as large serves too
            if set(names) <= set(key) and len(key) <= 2 * len(names) and current(stack):
                self._stacks.move_to_end(key)
                return stack
        stack = _Stack(self.model, names, self.dtype)
        self._stacks[tuple(names)] = stack
        while len(self._stacks) > self.max_sets:
            self._stacks.popitem(last=False)
        return stack

    def clear(self) -> None:
        self._stacks.clear()
        self._eligible.clear()
