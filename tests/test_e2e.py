"""End-to-end on the embedded SmolLM2-135M: few, purposeful, each exercising a whole user path."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smol():
    from deltatune.models import ensure_embedded_model

    return str(ensure_embedded_model())


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _batch():
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def test_train_save_and_load_in_peft_gives_same_logits(smol, tmp_path):
    import peft

    model = _load(smol)
    dt.attach(model, dt.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ids = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    dt.save_adapter(model, tmp_path / "adapter")

    theirs_model = peft.PeftModel.from_pretrained(_load(smol), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # and peft's own save loads back into deltatune with the same logits
    theirs_model.save_pretrained(tmp_path / "from_peft")
    again = dt.load_adapter(_load(smol), tmp_path / "from_peft")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_cli_merge_writes_a_model_plain_transformers_loads(smol, tmp_path):
    from deltatune.cli import main

    model = _load(smol)
    dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: small nonzero B
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    ids = _batch()
    with torch.no_grad():
        expected = model(ids).logits
    dt.save_adapter(model, tmp_path / "adapter")

    assert main(["merge", "--base", smol, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = _load(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-3, rtol=1e-3)
