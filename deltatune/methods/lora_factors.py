"""The step-0 factors of the LoRA initialisations, computed from one weight (METHODS.md §19): pure tensor
functions, no model, no config. `methods/lora_init.py` decides which to run for which layer, puts them into the
deltas (or quantizes the base with them) and writes the file; it re-exports these names.

    pissa_factors    (A, B) with s·BA = U_r Σ_r V_rᵀ (full SVD in float64, or svd_lowrank seeded per layer)
    olora_factors    (A, B) = (R[:r], Q[:, :r]) of W = QR
    loftq_factors    (Q_T, A, B): T rounds of Q_t = nf4(W − B_{t−1}A_{t−1}), (B_t, A_t) = SVD_r(W − Q_t)
    qpissa_factors   (Q_T, A, B): T rounds of (A, B) = PiSSA(res), Q = nf4(W − s·BA), res = W − dequant(Q)
"""
from __future__ import annotations

import math

import torch


def _seed(name: str) -> int:
    """A per-layer seed for svd_lowrank that depends only on the module name (same in every process)."""
    return int.from_bytes(name.encode()[-8:].rjust(8, b"\0"), "little") % (2**31 - 1) + len(name)


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None,
                  name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PiSSA (§19.1): B = U_r·√(Σ_r/s), A = √(Σ_r/s)·V_rᵀ, so s·BA = U_r Σ_r V_rᵀ. Full SVD in float64
    (deterministic), or svd_lowrank(q=r, niter) seeded from the module name; fp32 results."""
    w = weight.double()
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, V = U[:, :r], S[:r], Vh[:r].T
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(name))
            U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
    root = (S / scaling).sqrt()
    return (root[:, None] * V.T).float(), (U * root).float()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of OLoRA (§19.3): W = QR (reduced), B = Q[:, :r], A = R[:r]; no 1/s split."""
    Q, R = torch.linalg.qr(weight.double())
    return R[:r].float(), Q[:, :r].float()


def _nf4(weight: torch.Tensor):
    from ..quant.nf4 import quantize_nf4

    return quantize_nf4(weight.float(), blocksize=64, double_quant=False)  # peft's loftq_init / QPiSSA: no DQ


def _dequant(state) -> torch.Tensor:
    from ..quant.nf4 import dequantize_nf4

    return dequantize_nf4(state, torch.float32).double()


def _svd_split(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root  # (A, B), float64


def loftq_factors(weight: torch.Tensor, r: int, scaling: float, iters: int):
    """LoftQ (§19.5, Alg. 1): Q_t = nf4(W − B_{t−1}A_{t−1}), (B_t, A_t) = SVD_r(W − Q_t). Returns
    (Q_T, A_T/√s, B_T/√s), so Q_T + s·BA is LoftQ's approximation for any s."""
    w = weight.double()
    low_rank = torch.zeros_like(w)
    for _ in range(iters):
        state = _nf4(w - low_rank)
        A, B = _svd_split(w - _dequant(state), r)
        low_rank = B @ A
    root = math.sqrt(scaling)
    return state, (A / root).float(), (B / root).float()


def qpissa_factors(weight: torch.Tensor, r: int, scaling: float, iters: int, niter: int | None, name: str):
    """QPiSSA (§19.2, the authors' iterative form): res = W; T times: (A, B) = PiSSA(res), Q = nf4(W − s·BA),
    res = W − dequant(Q). Returns (Q_T, A, B) of the last round."""
    w = weight.double()
    residual = w
    for _ in range(iters):
        A, B = pissa_factors(residual, r, scaling, niter, name)
        state = _nf4(w - scaling * (B.double() @ A.double()))
        residual = w - _dequant(state)
    return state, A, B

