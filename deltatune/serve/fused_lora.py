"""Many plain LoRA adapters in one batch: every row gets its own adapter's sᵢ·Bᵢ·Aᵢ·x, in a few ops per site.

For the adapters a batch uses at a site (ranks r₁…rₖ, no padding between them) three kernels read the factors:

- **stacked** (decode, one token per row, few adapters): A_cat = [A₁; …; Aₖ] (Σr, d_in), B_cat = [B₁ … Bₖ]
  (d_out, Σr), and

      y_b += B_cat · (m_b ⊙ A_cat·x_b)        m_b = sᵢ on the block of row b's adapter i, 0 elsewhere

  two matmuls whatever the number of adapters; the other blocks add exact zeros, so row b gets exactly
  sᵢBᵢAᵢx_b. Each token pays Σr instead of rᵢ: cheap for one or a few adapters, not for many.
- **segmented** (decode, many adapters; Punica's SGMV): the rows grouped by adapter, each group padded to the
  largest (G rows), then per rank two batched matmuls (k, G, d_in)·(k, d_in, r) and (k, G, r)·(k, r, d_out)
  against each adapter's own factors, read once, and the rows scattered back: a token pays its own rᵢ.
  On the CPU this runs as one C++ call a site where serve/sgmv.py's kernel builds (no padding, buffers or
  scatter; it reads the factors near the memory's bandwidth), else in the torch ops above.
  The cost rule (SEGMENT_FROM) takes it where the stack's columns at a site are at least 4 times the largest
  rank of the batch's rows there (4 or more equal-rank adapters); `FusedLora(decode=...)` forces either.
- **gathered** (prefill, many tokens per row; Punica's BGMV): each row's own Aᵢ, Bᵢ gathered, one batched
  matmul per distinct rank, so a token pays only its own rᵢ.

Decode computes in fp32 (as peft keeps adapters; on an Intel Xeon a bf16 `(rows, 8) @ (8, 576)` product with
few rows took 2-18 ms against 20-40 µs in fp32; on an AMD EPYC without AMX the segmented products read bf16
factors at a third of fp32's rate); prefill computes in the base's dtype (bf16 there is 3x faster
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
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from ..core.adapter import resolve
from ..core.model import adapters as attached_adapters
from ..core.lowrank import LowRankFactors, low_rank_factors
from ..core.sites import weight_kind


class _SiteStack:
    """One site's factors for a set of adapters, in the layouts of the three kernels.

    The parts are laid out by rank, then adapter index, so that each rank's adapters are one slice of the
    stacked rows: A_rows (Σr, d_in) = [A₁; …; Aₖ] and B_rows (Σr, d_out) = [B₁ … Bₖ]ᵀ, fp32, serve the stacked
    product (as A_rowsᵀ and B_rows) and the segmented one (as (k, r, d_in) and (k, r, d_out) views), one copy."""

    def __init__(self, site: nn.Module, parts: list[tuple[int, LowRankFactors]], count: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.site = site
        rank = lambda d: d.A.shape[0]  # noqa: E731
        parts = sorted(parts, key=lambda p: (rank(p[1]), p[0]))
        # sites with the same key share per-forward row data (masks, row selections, segments)
        self.key = _Key(tuple((i, rank(d), float(d.scale)) for i, d in parts))
        f32 = dict(dtype=torch.float32, device=device)
        self.A_rows = torch.cat([d.A for _, d in parts]).to(**f32).contiguous()
        self.B_rows = torch.cat([d.B for _, d in parts], dim=1).to(**f32).T.contiguous()
        self.owner = torch.cat([torch.full((rank(d),), i, device=device) for i, d in parts])  # of each column
        self.scale = torch.cat([torch.full((rank(d),), float(d.scale), **f32) for _, d in parts])
        self.ranks = torch.zeros(count, dtype=torch.long)  # each adapter's rank here, 0: none (on the CPU: cost rule)
        self.ranks[[i for i, _ in parts]] = torch.tensor([rank(d) for _, d in parts])
        # one group per rank: A (k, r, d_in), B (k, r, d_out) views of the fp32 rows (segmented decode), the same
        # in the base's dtype for the gathered prefill (views again on an fp32 base; with many tokens per row a
        # bf16 product is 3x faster than casting the activations to fp32 and back), fp32 scales (k,), and each
        # adapter's index in its group (-1: not in the group)
        self.groups = []
        start = 0
        for r in sorted({rank(d) for _, d in parts}):
            members = [(i, d) for i, d in parts if rank(d) == r]
            k = len(members)
            local = torch.full((count,), -1, dtype=torch.long, device=device)
            local[[i for i, _ in members]] = torch.arange(k, device=device)
            A = self.A_rows[start:start + k * r].view(k, r, -1)
            B = self.B_rows[start:start + k * r].view(k, r, -1)
            scales = torch.tensor([float(d.scale) for _, d in members], **f32)
            self.groups.append(_Group(r, local, A, B, scales, A.to(dtype), B.to(dtype)))
            start += k * r


class _Key(tuple):
    """A site's adapters, ranks and scales as a dict key whose hash is computed once (every site looks it up)."""

    def __new__(cls, items: tuple) -> "_Key":
        key = super().__new__(cls, items)
        key._hash = tuple.__hash__(key)
        return key

    def __hash__(self) -> int:
        return self._hash


class _Group(NamedTuple):
    """The adapters of one rank at a site: fp32 factors (segmented decode) and in the activations' dtype
    (gathered prefill; the same tensors when that is fp32)."""
    r: int
    local: torch.Tensor  # (count,) index in the group, -1: not in it
    A: torch.Tensor  # (k, r, d_in)
    B: torch.Tensor  # (k, r, d_out)
    scales: torch.Tensor  # (k,) fp32
    A_act: torch.Tensor
    B_act: torch.Tensor


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
                    factors = low_rank_factors(delta)
                    if factors.A.shape[0]:  # rank 0 (an AdaLoRA site whose triplets were all pruned) adds nothing
                        by_site.setdefault(path, []).append((i, factors))
            self.sites = [_SiteStack(model.get_submodule(resolve(model, p)), parts, len(names), embeddings.device,
                                     dtype or embeddings.dtype)
                          for p, parts in by_site.items()]


# The decode kernel's cost rule: segmented where the stack's columns at a site are at least this many times the
# largest rank among the batch's rows there (the stacked product multiplies every row by all Σr columns, the
# segmented one by its own rᵢ but pays a gather, padding and a scatter; measured in bench/bench_serve.py)
SEGMENT_FROM = 4


class _Kernel:
    """The forward hook of one site for one forward: adds each row's own sᵢBᵢAᵢx to the site's output."""

    def __init__(self, stack: _SiteStack, rows: torch.Tensor, shared: dict, decode: str, workspace: dict,
                 sgmv: Callable[[], Callable | None]) -> None:
        self.stack, self.rows, self.shared = stack, rows, shared  # rows: (B,) adapter index, -1 for none
        self.decode, self.workspace, self.sgmv = decode, workspace, sgmv

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (B, T, d_in)
        with torch.autocast(x.device.type, enabled=False):
            if x.dim() == 3 and x.shape[1] > 1:
                return self._gathered(x, output)
            one_token_a_row = x.reshape(-1, x.shape[-1]).shape[0] == self.rows.shape[0] and output.is_contiguous()
            if one_token_a_row and self._shared("segmented", self._choose):
                return self._segmented(x, output)
            return self._stacked(x, output)

    def _choose(self) -> bool:
        """The cost rule (SEGMENT_FROM) for this forward, or the mode FusedLora.decode forces."""
        if self.decode != "auto":
            return self.decode == "segmented"
        rows = self.rows.cpu()
        own = self.stack.ranks[rows.clamp(min=0)] * (rows >= 0)
        largest = int(own.max()) if own.numel() else 0
        return largest > 0 and self.stack.A_rows.shape[0] >= SEGMENT_FROM * largest

    def _stacked(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Few tokens per row (decode), few adapters: two matmuls over all the adapters' columns, masked per row."""
        st = self.stack
        mask = self._shared("mask", lambda: torch.where(self.rows[:, None] == st.owner[None, :], st.scale, 0.0))
        h = torch.matmul(x.to(torch.float32), st.A_rows.T)  # (B, T, Σr)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return output.add_(torch.matmul(h, st.B_rows).to(output.dtype))

    def _segmented(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """One token per row (decode), many adapters (Punica's SGMV): the rows grouped by adapter, each group
        padded to the largest, two batched matmuls against each adapter's own factors (read once), scattered
        back: a row pays its own rank, the factors are read once per step. The products write into buffers
        kept across sites and steps (`_buffer`): a fresh output of a few hundred KB per product cost as much
        as the product here (new pages faulted in)."""
        width, d_out = x.shape[-1], output.shape[-1]
        xs, out = x.reshape(-1, width), output.view(-1, d_out)  # (B, d_in), (B, d_out): one token a row
        f32 = torch.float32
        if "sgmv" not in self.shared:  # looked up once a forward, by the first segmented site
            self.shared["sgmv"] = self.sgmv()
        compiled = self.shared["sgmv"] if x.dtype == output.dtype and x.device.type == "cpu" else None
        for g, group in enumerate(self.stack.groups):
            seg = self._shared(("segments", g), lambda: _Segments(group.local, self.rows))
            if seg.rows.numel() == 0:
                continue
            if compiled is not None:  # the C++ kernel (serve/sgmv.py): no padding, buffers or scatter
                compiled(xs.contiguous(), out, group.A, group.B, group.scales, seg.rows, seg.starts, seg.ids)
                continue
            A, B, scales = group.A, group.B, group.scales  # (k, r, d_in), (k, r, d_out), (k,)
            if seg.used is not None:  # a subset of the group's adapters
                A, B, scales = A.index_select(0, seg.used), B.index_select(0, seg.used), scales.index_select(0, seg.used)
            k, G, r = seg.count, seg.width, group.r
            padded = self._buffer("x", (k * G, width), f32)
            if xs.dtype == f32:
                torch.index_select(xs, 0, seg.source, out=padded)
            else:
                padded.copy_(torch.index_select(xs, 0, seg.source, out=self._buffer("xin", (k * G, width), xs.dtype)))
            # hᵀ = A·xᵀ (k, r, G): A's rows stream in the order they lie; measured 2x faster than x·Aᵀ here
            hT = torch.bmm(A, padded.view(k, G, width).transpose(1, 2), out=self._buffer("h", (k, r, G), f32))
            hT.mul_(scales[:, None, None])
            y = torch.bmm(hT.transpose(1, 2), B, out=self._buffer("y", (k, G, d_out), f32)).view(k * G, d_out)
            if seg.slots is not None:  # drop the padding
                y = torch.index_select(y, 0, seg.slots, out=self._buffer("rows", (seg.rows.numel(), d_out), f32))
            if out.dtype != f32:
                y = self._buffer("cast", tuple(y.shape), out.dtype).copy_(y)
            out.index_add_(0, seg.rows, y)
        return output

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (shape) view of the workspace's buffer `name`, which grows to the largest size asked."""
        view = self.workspace.get((name, shape, dtype))
        if view is not None:
            return view
        size = 1
        for n in shape:
            size *= n
        flat = self.workspace.get((name, dtype))
        if flat is None or flat.numel() < size:
            for key in [k for k in self.workspace if k[0] == name and k[-1] == dtype]:
                del self.workspace[key]  # the views of the smaller buffer
            flat = self.workspace[(name, dtype)] = torch.empty(size, dtype=dtype, device=self.rows.device)
        if len(self.workspace) > 256:  # views for many batch shapes: keep the buffers, drop the views
            for key in [k for k in self.workspace if len(k) == 3]:
                del self.workspace[key]
        view = self.workspace[(name, shape, dtype)] = flat[:size].view(shape)
        return view

    def _gathered(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Many tokens per row (prefill): each row's own factors gathered, one batched matmul per rank; the
        stacked product would multiply every token by every adapter's columns."""
        for g, group in enumerate(self.stack.groups):
            sel, ids = self._shared(("group", g), lambda: _selection(group.local[self.rows.clamp(min=0)], self.rows))
            if ids.numel() == 0:
                continue
            At, Bt = group.A_act.index_select(0, ids).transpose(1, 2), group.B_act.index_select(0, ids)
            xs = x if sel is None else x.index_select(0, sel)
            h = torch.bmm(xs.to(At.dtype), At) * group.scales.to(At.dtype).index_select(0, ids)[:, None, None]
            out = torch.bmm(h, Bt).to(output.dtype)  # (rows, T, d_out)
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


class _Segments:
    """The rows of one rank group in the segmented layout: grouped by adapter, each group padded to the largest.

    rows: the batch positions of the group's rows, by adapter; source (k·G,): the row each padded position
    reads (padding repeats a real row: its output is dropped); slots: the padded positions of `rows`, None when
    there is no padding; used: the group's adapters present, None when all are; count k, width G; for the C++
    kernel, ids: the adapters present, ids[s]'s rows being rows[starts[s]:starts[s + 1]]."""

    def __init__(self, local: torch.Tensor, rows: torch.Tensor) -> None:
        member = (rows >= 0) & (local[rows.clamp(min=0)] >= 0)
        ids = torch.where(member, local[rows.clamp(min=0)], -1)
        positions = member.nonzero().flatten()
        ids = ids.index_select(0, positions)
        order = torch.argsort(ids, stable=True)
        self.rows, ids = positions.index_select(0, order), ids.index_select(0, order)
        present, counts = torch.unique_consecutive(ids, return_counts=True)
        self.count, self.width = int(present.numel()), int(counts.max()) if counts.numel() else 0
        self.used = None if self.count == int((local >= 0).sum()) else present
        first = torch.cumsum(counts, 0) - counts  # where each adapter's rows start in self.rows
        within = torch.arange(ids.numel(), device=ids.device) - first.repeat_interleave(counts)
        slots = torch.arange(self.count, device=ids.device).repeat_interleave(counts) * self.width + within
        padded = torch.arange(self.width, device=ids.device)[None, :].minimum(counts[:, None] - 1)  # (k, G)
        self.source = self.rows.index_select(0, (first[:, None] + padded).flatten())
        self.slots = None if bool((counts == self.width).all()) else slots
        self.ids, self.starts = present, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


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
    """dtype: of the sites' activations when it is not the base's (the autocast dtype), for the prefill kernel.
    decode: the decode kernel, "auto" (the cost rule, SEGMENT_FROM), "stacked" or "segmented". sgmv: the
    segmented product through the C++ kernel of serve/sgmv.py where it builds (False: torch ops only)."""

    def __init__(self, model: nn.Module, max_sets: int = 4, dtype: torch.dtype | None = None,
                 decode: str = "auto", sgmv: bool = True) -> None:
        if decode not in ("auto", "stacked", "segmented"):
            raise ValueError(f"decode must be 'auto', 'stacked' or 'segmented', got {decode!r}")
        self.model, self.dtype, self.decode, self.sgmv = model, dtype, decode, sgmv
        if sgmv and decode != "stacked" and all(p.device.type == "cpu" for p in model.parameters()):
            from . import sgmv as compiled

            compiled.prepare()  # built in the background while the engine starts
        self._workspace: dict = {}  # the segmented kernel's buffers: 5 of the largest site's size (a few MB)
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
        handles = [site.site.register_forward_hook(_Kernel(site, rows, shared, self.decode, self._workspace,
                                                           self._compiled)) for site in stack.sites]
        try:
            yield [None if n in fused else n for n in names]
        finally:
            for handle in handles:
                handle.remove()

    def _compiled(self) -> Callable | None:
        """The C++ segmented kernel where `sgmv` allows it and it builds (serve/sgmv.py), else None: torch ops."""
        if not self.sgmv:
            return None
        from . import sgmv

        return sgmv.kernel()

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
        self._workspace.clear()
        self._eligible.clear()
