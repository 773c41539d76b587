"""`deltatune inspect`: each method describes its adapter (AdapterConfig.describe), and the file is validated as
loading validates it (NaN/Inf, absurd magnitudes, integer tensors, sizes the config implies); a refused file
is said so, with status 2, never "readable by peft"."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt

from conftest import make_tiny_llama
from test_cli import run

WEIGHTS = "adapter_model.safetensors"


def saved(tmp_path, config, name="adapter"):
    dt.save_adapter(dt.attach(make_tiny_llama(), config), tmp_path / name)
    return tmp_path / name


def rows(out: str) -> dict[str, str]:
    return {line[:12].strip(): line[13:] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("config, expected", [
    (dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
     {"variant": "LoRA", "r": "4", "targets": "q_proj, v_proj", "modules": "4 adapted"}),
    (dt.LoraConfig(r=2, use_dora=True, target_modules="all-linear"),  # 7 linear layers x 2 blocks
     {"variant": "DoRA", "targets": "all-linear", "modules": "14 adapted"}),
    (dt.IA3Config(), {"modules": "6 adapted"}),  # k, v, down_proj x 2 blocks (IA3 has one tensor per module)
    (dt.BottleneckConfig(), {"modules": "4 adapted"}),  # after attention and MLP x 2 blocks
    (dt.PromptTuningConfig(num_virtual_tokens=7), {"prompt": "7 virtual tokens of 64 dims", "targets": "none"}),
])
def test_each_method_describes_its_adapter(tmp_path, capsys, config, expected):
    code, out, _ = run(["inspect", str(saved(tmp_path, config))], capsys)
    shown = rows(out)
    assert code == 0, out
    for key, value in expected.items():
        assert shown[key].startswith(value), (key, shown[key])
    assert shown["task type"] == "CAUSAL_LM" and shown["validated"].startswith("yes")


@pytest.mark.parametrize("damage, reason", [
    (lambda t: t.fill_(float("nan")), "NaN/Inf"),
    (lambda t: t.fill_(3e38), "beyond"),
    (lambda t: t.to(torch.int64), "int64"),
])
def test_a_file_loading_refuses_is_not_called_readable(tmp_path, capsys, damage, reason):
    path = saved(tmp_path, dt.LoraConfig(r=2))
    tensors = load_file(path / WEIGHTS)
    key = next(iter(tensors))
    tensors[key] = damage(tensors[key].clone())
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    code, out, _ = run(["inspect", str(path)], capsys)
    shown = rows(out)
    assert code == 2 and "REFUSED" in shown["validated"] and reason in shown["validated"]
    assert "peft" not in shown["readable by"]
    with pytest.raises(dt.AdapterFileError, match=reason):
        dt.load_adapter(make_tiny_llama(), path)


def test_huge_num_virtual_tokens_is_refused_before_allocating(tmp_path):
    path = saved(tmp_path, dt.PromptTuningConfig(num_virtual_tokens=3))
    record = json.loads((path / "adapter_config.json").read_text())
    for p in (20_000_000, 1_000_000_000):  # 2e7 x 64 fp32 would be 5 GB; 1e9 the allocator's own error
        (path / "adapter_config.json").write_text(json.dumps({**record, "num_virtual_tokens": p}))
        with pytest.raises(dt.AdapterFileError, match=f"num_virtual_tokens is {p}, but the file's prompt_embeddings has 3 rows"):
            dt.load_adapter(make_tiny_llama(), path)


@pytest.mark.parametrize("init, readers", [
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, "deltatune"),
    ({"init_lora_weights": "pissa", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, "deltatune"),  # QPiSSA
    ({"init_lora_weights": "pissa"}, "peft, vLLM, deltatune"),  # saved as the rank-2r LoRA of the original base
])
def test_a_4bit_start_is_readable_only_where_its_base_is_rebuilt(tmp_path, capsys, init, readers):
    code, out, _ = run(["inspect", str(saved(tmp_path, dt.LoraConfig(r=2, target_modules=["q_proj"], **init)))], capsys)
    assert code == 0 and rows(out)["readable by"] == readers, out
