"""8-bit AdamW states: the loss curve tracks 32-bit AdamW on the tiny Llama; state bytes match the formula."""
from __future__ import annotations

import sys

import pytest
import torch

from deltatune.quant import quantizable_linears
from deltatune.quant.optim8bit import (
    OptimizerUnavailableError, adamw8bit, adamw_state_bytes, lora_shapes, measured_state_bytes, optimizer_memory,
)

from conftest import make_tiny_llama


def loss_curve(make_optimizer, steps=25):
    model = make_tiny_llama().train()
    optimizer = make_optimizer(model.parameters())
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses), optimizer


def test_adamw8bit_loss_curve_tracks_32bit():
    pytest.importorskip("bitsandbytes")
    hyper = dict(lr=1e-3, weight_decay=0.01)
    ref, _ = loss_curve(lambda p: torch.optim.AdamW(p, **hyper))
    ours, optimizer = loss_curve(lambda p: adamw8bit(p, **hyper))
    assert ref[-1] < 0.7 * ref[0]  # it learns
    assert (ours - ref).abs().max() < 0.01 * ref[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shared_maps = 2 * 256 * 4  # the signed and unsigned dynamic maps, shared by every tensor
    assert measured_state_bytes(optimizer) == adamw_state_bytes([p.shape for p in params], bits=8) + shared_maps
    assert any(s["state1"].dtype == torch.uint8 for s in optimizer.state.values())


def test_state_bytes_formula():
    assert adamw_state_bytes([100, 4096], bits=32) == 8 * 4196
    # below 4096 elements: fp32 states; from 4096: 2 bytes + 2 fp32 absmax per 256-block
    assert adamw_state_bytes([100, 4096], bits=8) == 800 + 2 * 4096 + 8 * 16
    with pytest.raises(ValueError, match="8 or 32"):
        adamw_state_bytes([10], bits=16)


def test_optimizer_memory_full_against_lora():
    model = make_tiny_llama()
    names = quantizable_linears(model)
    memory = optimizer_memory(model, lora_shapes(model, 16, names))
    assert memory.full_params == sum(p.numel() for p in model.parameters())
    per_layer = 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert memory.adapter_params == 2 * per_layer and memory.adapter_32bit == 8 * memory.adapter_params
    assert memory.full_8bit < memory.full_32bit / 3
    assert "full fine-tuning" in memory.table()


def test_paged_optimizer_on_cpu_is_a_clear_error():
    with pytest.raises(OptimizerUnavailableError, match="paged optimizers need CUDA"):
        adamw8bit([torch.nn.Parameter(torch.zeros(3))], paged=True)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(OptimizerUnavailableError, match="pip install"):
        adamw8bit([torch.nn.Parameter(torch.zeros(3))])
