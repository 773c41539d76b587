"""Micro-benchmark of one LoRA linear layer: what the core's site costs over the bare LoRA arithmetic, and peft.

    python bench/lora_layer_micro.py            # SmolLM2 shapes (1024 tokens, 576 <-> 1536), 2 threads

Not a deltatune test. Every candidate is first checked against deltatune's output (allclose), then timed for
a training step of the layer alone (forward + backward, gradients for A, B and the input), interleaved
rounds, median per candidate, in fp32 and under bf16 autocast:

  bare       h = W0 x + B(A(x) · s), written out by hand: no adapter machinery at all
  deltatune  a WeightSite holding a LoraLinear delta (what `dt.attach` builds)
  peft       peft's lora.Linear (what `get_peft_model` builds)

Because all three run in one process, interleaved, the ratios hold even when other work shares the machine;
the absolute times do not.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import deltatune as dt

TOKENS = 1024  # batch 4 x 256
SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # (d_in, d_out) of SmolLM2's q/o, up/gate, down projections
R, ALPHA = 16, 32


class Bare(nn.Module):
    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.base, self.s = base, ALPHA / R
        self.A, self.B = nn.Linear(A.shape[1], R, bias=False), nn.Linear(R, B.shape[0], bias=False)
        self.A.weight.data.copy_(A)
        self.B.weight.data.copy_(B)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x) * self.s)


def candidates(d_in: int, d_out: int) -> dict[str, nn.Module]:
    import peft

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    ours = dt.attach(nn.Sequential(base), dt.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=False))
    delta = ours[0].deltas["default"]
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(d_in, d_out, bias=False)),
                                 peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    layer = theirs.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(base.weight)
        layer.lora_A["default"].weight.copy_(delta.lora_A.weight)
        layer.lora_B["default"].weight.copy_(delta.lora_B.weight)
    return {"bare": Bare(base, delta.lora_A.weight.detach(), delta.lora_B.weight.detach()), "deltatune": ours, "peft": theirs}


def step(module: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = module(x)
    out.float().sum().backward()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"one LoRA layer (r={R}), {TOKENS} tokens, forward + backward; median ms over {args.rounds} interleaved rounds")
    print(f"{'shape (in->out)':<16} {'precision':<9} {'bare':>8} {'deltatune':>10} {'peft':>8} {'dt/bare':>8} {'dt/peft':>8}")
    for d_in, d_out in SHAPES:
        mods = candidates(d_in, d_out)
        for bf16 in (False, True):
            x = torch.randn(4, TOKENS // 4, d_in, requires_grad=True)
            ref = step(mods["deltatune"], x, bf16).detach()
            for name, mod in mods.items():
                torch.testing.assert_close(step(mod, x, bf16).detach(), ref, atol=2e-2 if bf16 else 1e-4, rtol=1e-2)
            times: dict[str, list[float]] = {name: [] for name in mods}
            for _ in range(args.rounds):
                for name, mod in mods.items():
                    start = time.perf_counter()
                    step(mod, x, bf16)
                    times[name].append((time.perf_counter() - start) * 1e3)
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{f'{d_in}->{d_out}':<16} {'bf16' if bf16 else 'fp32':<9} {med['bare']:>8.2f} {med['deltatune']:>10.2f} "
                  f"{med['peft']:>8.2f} {med['deltatune'] / med['bare']:>7.2f}x {med['deltatune'] / med['peft']:>7.2f}x")


if __name__ == "__main__":
    main()
