"""`deltatune combine` and `deltatune lorahub` in process, on the tiny Llama saved by test_cli's fixture."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt

from conftest import make_tiny_llama
from test_cli import chats, model_dir, run  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i, n in enumerate("ab"):
        model = make_tiny_llama()
        torch.manual_seed(50 + i)
        dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]), n)
        dt.save_adapter(model, root / n, n)
    return root


def test_combine_writes_an_adapter_and_names_bad_flags(model_dir, loras, tmp_path, capsys):
    code, out, err = run(["combine", "--base", str(model_dir), "--adapter", str(loras / "a"), "--adapter",
                          str(loras / "b"), "--weights", "0.5", "-0.5", "--type", "cat", "--out", str(tmp_path / "mix"),
                          "--merged", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert dt.read_adapter(tmp_path / "mix")[0].r == 8 and "into" in out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unmerged = dt.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tmp_path / "mix")
    ids = torch.tensor([[6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-5)
    code, _, err = run(["combine", "--base", str(model_dir), "--adapter", str(loras / "a"), "--weights", "1", "2",
                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--weights gives 2 numbers for 1 --adapter" in err
    code, _, err = run(["combine", "--base", str(model_dir), "--adapter", str(loras / "a"), "--adapter", str(loras / "b"),
                        "--weights", "1", "-1", "--type", "linear", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "negative" in err and not (tmp_path / "x").exists()


def test_lorahub_writes_the_adapter_and_its_search(model_dir, loras, chats, tmp_path, capsys):  # noqa: F811
    code, out, err = run(["lorahub", "--base", str(model_dir), "--adapter", str(loras / "a"), "--adapter",
                          str(loras / "b"), "--data", str(chats), "--budget", "3", "--seeds", "0", "1",
                          "--precision", "fp32", "--out", str(tmp_path / "hub")], capsys)
    assert code == 0, err
    search = json.loads((tmp_path / "hub" / "lorahub.json").read_text())
    assert len(search["weights"]) == 2 and [r["seed"] for r in search["runs"]] == [0, 1]
    assert dt.read_adapter(tmp_path / "hub")[0].r == 4 and "weights" in out
