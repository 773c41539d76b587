"""Mixed batches: a routing plan says which adapter each row (or each token) of a forward uses.

    plan = RoutingPlan(["a", None, "b", "a"])          # per row: adapter name, None = the base model
    plan = RoutingPlan(names, per_token=True)          # continuous batching: requests flattened into tokens

The plan is built once (per `deltatune.route` block) and keeps, per device, one index tensor per adapter, so
the layers of a forward reuse the same tensors instead of rebuilding them. `ids` (position -> index into
`adapters`) is the form a gathered kernel (Punica's BGMV, S-LoRA's MBGMM) takes: a site that has such a
kernel for its deltas reads `plan.ids`/`plan.adapters` instead of the per-adapter groups.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import torch

_PLAN: contextvars.ContextVar["RoutingPlan | None"] = contextvars.ContextVar("deltatune_routing", default=None)


class RoutingPlan:
    def __init__(self, names: Sequence[str | None], *, per_token: bool = False) -> None:
        self.adapters: list[str | None] = list(dict.fromkeys(names))  # id -> adapter name
        index = {name: i for i, name in enumerate(self.adapters)}
        self.ids = torch.tensor([index[n] for n in names], dtype=torch.long)  # position -> adapter id
        self.size = len(names)
        self.per_token = per_token
        self._rows = {name: [i for i, n in enumerate(names) if n == name] for name in self.adapters}
        self._groups: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def names(self) -> list[str]:
        return [n for n in self.adapters if n is not None]

    def groups(self, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(adapter name, positions on `device`) for every adapter in the plan (not the base rows)."""
        if device not in self._groups:
            self._groups[device] = [
                (name, torch.tensor(rows, dtype=torch.long, device=device))
                for name, rows in self._rows.items() if name is not None
            ]
        return self._groups[device]

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """`t` viewed with the routed positions as dimension 0 (rows as they are; tokens flattened)."""
        if not self.per_token:
            if t.shape[0] != self.size:
                raise ValueError(
                    f"mixed batch routes {self.size} rows but a layer received a batch of {t.shape[0]}; give one "
                    "adapter name per row of the batch (beam search and sampling several sequences per prompt "
                    "multiply the rows)"
                )
            return t
        lead = 0
        while lead < t.dim() and math.prod(t.shape[:lead]) < self.size:
            lead += 1
        if math.prod(t.shape[:lead]) != self.size:
            raise ValueError(f"per-token routing covers {self.size} tokens but a layer received shape {tuple(t.shape)}")
        return t.reshape(self.size, *t.shape[lead:])


def current_plan() -> RoutingPlan | None:
    return _PLAN.get()


@contextlib.contextmanager
def using(plan: RoutingPlan) -> Iterator[RoutingPlan]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
