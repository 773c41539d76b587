"""Many plain LoRA adapters in one batch as one stacked low-rank product per site.

For the adapters a batch uses at a site, with ranks r₁…rₖ, the engine keeps

    A_cat = [A₁; …; Aₖ]   (Σr, d_in)       B_cat = [B₁ … Bₖ]   (d_out, Σr)       s_cat: sᵢ on block i

and adds to the base output, for every row b at once,

    y_b += B_cat · (m_b ⊙ s_cat ⊙ A_cat·x_b)        m_b = 1 on the block of row b's adapter, 0 elsewhere

which is exactly sᵢ·Bᵢ·Aᵢ·x_b for row b (the other blocks contribute exact zeros) and base output for base
rows. Two matmuls per site whatever the number of adapters, and mixed ranks without padding to the largest
(Punica/S-LoRA gather per row instead; on a CPU the stacked product is cheaper, measured in docs/serving.md).
The core's routed path runs one small product per adapter per site: measured on SmolLM2-135M, 32 adapters
made a decode step of 32 rows 2.2x slower than the base; stacked, see docs/serving.md.

The stacks are built once per set of adapters and cached (least recently used, a few sets); a later batch
whose adapters are a subset of a cached set reuses it. Adapters other than plain LoRA on linear layers
(DoRA, IA3, bottleneck, prompt tuning) are left to `deltatune.route`, in the same forward.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
from torch import nn

from ..core.model import adapters as attached_adapters
from ..methods.lora import LoraLinear


class _Stack:
    """The stacked factors of a set of adapters at every site any of them targets."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.adapters = [attached_adapters(model)[n] for n in names]  # held: a stack is valid for these objects only
        self.index = {n: i for i, n in enumerate(names)}
        self.rank = 0
        by_site: dict[str, list[tuple[int, LoraLinear]]] = {}
        for i, name in enumerate(names):
            for path, delta in attached_adapters(model)[name].deltas(model):
                by_site.setdefault(path, []).append((i, delta))
        self.sites: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for path, parts in by_site.items():
                A = torch.cat([d.lora_A.weight for _, d in parts]).float()  # (Σr, d_in)
                B = torch.cat([d.lora_B.weight for _, d in parts], dim=1).float()  # (d_out, Σr)
                owner = torch.cat([torch.full((d.lora_A.weight.shape[0],), i) for i, d in parts])  # (Σr,) adapter index
                scale = torch.cat([torch.full((d.lora_A.weight.shape[0],), float(d.scaling)) for _, d in parts])
                self.sites.append((model.get_submodule(path), A.T.contiguous(), B.T.contiguous(), owner, scale))
                self.rank = max(self.rank, A.shape[0])


class FusedLora:
    def __init__(self, model: nn.Module, max_sets: int = 4) -> None:
        self.model = model
        self.max_sets = max_sets
        self._stacks: OrderedDict[tuple, _Stack] = OrderedDict()
        self._eligible: dict[str, tuple[object, bool]] = {}

    def eligible(self, name: str) -> bool:
        """Plain LoRA on linear layers only, without modules_to_save or trained biases (dropout is off: the
        engine runs the model in eval mode)."""
        adapter = attached_adapters(self.model)[name]
        cached = self._eligible.get(name)
        if cached is not None and cached[0] is adapter:
            return cached[1]
        deltas = [d for _, d in adapter.deltas(self.model)]
        ok = bool(deltas) and not (adapter.saved or adapter.selected or adapter.part(self.model) is not None) and all(
            type(d) is LoraLinear and isinstance(d.lora_dropout, (nn.Identity, nn.Dropout)) for d in deltas)
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
        handles = []
        masks: dict[int, torch.Tensor] = {}
        for site, A, B, owner, scale in stack.sites:
            key = id(owner)
            if key not in masks:  # (B, Σr): sᵢ on the block of the row's adapter, 0 elsewhere
                masks[key] = torch.where(rows[:, None] == owner.to(device)[None, :], scale.to(device), 0.0)
            handles.append(site.register_forward_hook(_adder(A.to(device), B.to(device), masks[key])))
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
        stack = _Stack(self.model, names)
        self._stacks[tuple(names)] = stack
        while len(self._stacks) > self.max_sets:
            self._stacks.popitem(last=False)
        return stack

    def clear(self) -> None:
        self._stacks.clear()
        self._eligible.clear()


def _adder(A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (rows, T, d_in)
        h = torch.matmul(x.to(A.dtype), A)  # (rows, T, Σr)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return output.add_(torch.matmul(h, B).to(output.dtype))
    return hook
