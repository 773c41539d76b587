"""AdapterFusion (Pfeiffer et al. 2021, arXiv:2005.00247, §3): learned attention over frozen bottleneck adapters.

    h (the block's output) ──► query hQ          u_n = W_up,n·φ(W_down,n·h)  (adapter n's change, n = 1..N)
                               keys   u_n K      s = softmax_n((hQ)·(u_n K)ᵀ)       per layer and token
                               values u_n V      o = h + Σ_n s_n·(u_n V)

Stage two of the paper: N bottleneck adapters (Houlsby, Pfeiffer or any `BottleneckAdapter`), trained on their
own tasks, stay frozen and attached; the fusion is a block delta on the same sites whose only parameters are
Q, K (d×d, with bias, N(0, 0.02), AdapterHub's "dynamic" default) and V (d×d, no bias, identity with 1e-6 off
the diagonal: o = h + Σ s_n u_n at the start), trained with the regulariser λ·Σ_layers ‖I − V‖²_F
(λ = `regularization`, 0.01) through the registry's extra loss term. With s one-hot on n and V = I the output
is adapter n's alone. AdapterHub's temperature schedule is not modelled (T = 1).

An adapter that depends on other adapters: the config names the adapters it fuses (`adapters`), its file holds
only the fusion weights, and attaching or loading it without them attached, or deleting one of them while the
fusion exists, is refused with a message. The fused adapters must sit on the same sites with the same width
(checked at attach, naming the first that differs). Make the fusion active alone (the fused adapters then run
only inside it); it is not mergeable (softmax over nonlinear adapters). Deltatune's own method and file.

Learning rate: 5e-5 in the paper (§4.1, BERT-base, 10 epochs); 1e-3 here for the small models and short runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError
from ..core.delta import Delta
from ..core.model import adapters
from ..core.registry import register
from ..core.sites import Stage, Target
from .bottleneck import BottleneckAdapter


@dataclass(frozen=True)
class AdapterFusionConfig(AdapterConfig):
    """AdapterFusion over the named bottleneck adapters (attached before the fusion).

    adapters: the names of the N >= 2 adapters fused (the file records them; loading needs them attached).
    regularization: λ of λ·Σ‖I − V‖²_F (AdapterHub's 0.01; 0 turns it off).
    target_modules: filled at attach with the fused adapters' sites.
    """

    peft_type: ClassVar[str] = "ADAPTER_FUSION"
    recommended_lr: ClassVar[float] = 1e-3

    adapters: tuple[str, ...] = ()
    regularization: float = 0.01

    @property
    def depends_on(self) -> tuple[str, ...]:
        """The adapters this one needs attached (the core refuses a load without them, or deleting one of them)."""
        return tuple(self.adapters)

    def validate(self) -> None:
        if len(self.adapters) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise ConfigError(f"adapters must name at least two different bottleneck adapters to fuse, got "
                              f"{list(self.adapters)!r}")
        if isinstance(self.regularization, bool) or not isinstance(self.regularization, (int, float)) \
                or self.regularization < 0:
            raise ConfigError(f"regularization must be a number >= 0, got {self.regularization!r}")


def resolve(model: nn.Module, config: AdapterFusionConfig) -> AdapterFusionConfig:
    """The fused adapters' common sites as target_modules; refused if they differ in sites, kind or width."""
    attached = adapters(model)  # all of them: the core checked `depends_on` before calling this
    sites = {n: dict(attached[n].deltas(model)) for n in config.adapters}
    first = config.adapters[0]
    for name in config.adapters:
        kinds = {type(d).__name__ for d in sites[name].values()}
        if not sites[name] or not all(isinstance(d, BottleneckAdapter) for d in sites[name].values()):
            raise ConfigError(f"adapter {name!r} ({attached[name].config.peft_type}, {', '.join(sorted(kinds)) or 'no deltas'}) "
                              "is not a bottleneck adapter; AdapterFusion fuses BOTTLENECK or PFEIFFER adapters")
        if set(sites[name]) != set(sites[first]):
            other = sorted(set(sites[name]) ^ set(sites[first]))[0]
            raise ConfigError(f"adapters {first!r} and {name!r} sit on different sites (e.g. {other}); a fusion needs "
                              "adapters on the same modules")
        for path, delta in sites[name].items():
            want = sites[first][path].adapter_down.in_features
            if delta.adapter_down.in_features != want:
                raise ConfigError(f"adapters {first!r} and {name!r} have different widths at {path} "
                                  f"({want} and {delta.adapter_down.in_features}); a fusion needs equal widths")
    return config.replace(target_modules=tuple(sites[first]))


class FusionLayer(Delta):
    """o = h + Σ_n softmax_n((hQ)·(u_n K)ᵀ)·(u_n V), u_n the fused adapters' changes at this site."""

    site = "block"
    mergeable = False
    supports = BottleneckAdapter.supports

    def __init__(self, target: Target, config: AdapterFusionConfig) -> None:
        super().__init__(target, config)
        self.fused = tuple(config.adapters)
        d = target.output_width()
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        deltas = stage.site.deltas
        missing = [n for n in self.fused if n not in deltas]
        if missing:
            raise RuntimeError(f"the fused adapter {missing[0]!r} is gone from this site; re-attach it")
        h = y.to(self.query.weight.dtype)
        u = torch.stack([deltas[n](x, y, stage).to(h.dtype) - h for n in self.fused], dim=-2)  # (..., N, d)
        scores = torch.einsum("...d,...nd->...n", self.query(h), self.key(u))  # (..., N)
        weights = torch.softmax(scores, dim=-1)
        return y + torch.einsum("...n,...nd->...d", weights, self.value(u)).to(y.dtype)

    def regulariser(self) -> torch.Tensor:
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return (eye - self.value.weight).square().sum()


def loss_term(model: nn.Module, config: AdapterFusionConfig, name: str) -> torch.Tensor:
    """λ·Σ_layers ‖I − V‖²_F (AdapterHub's fusion regularisation)."""
    terms = [delta.regulariser() for _, delta in adapters(model)[name].deltas(model)]
    return config.regularization * torch.stack(terms).sum()


register(AdapterFusionConfig, FusionLayer, resolve=resolve, loss_term=loss_term, readers=("deltatune",))
