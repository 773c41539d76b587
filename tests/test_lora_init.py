"""LoRA initialisations (deltatune.methods.lora_init): PiSSA, pissa_niter_K, OLoRA, LoftQ, QPiSSA, validation.

Parity: the formulas (s·BA = U_r Σ_r V_rᵀ; B = Q_r, A = R_r), the step-0 function (the base's), peft loading the
rank-2r file on the original base with the trained model's logits, merged = unmerged, and for the 4-bit starts
a base rebuilt from the original weights plus the file with NF4 codes bitwise equal to those trained on, in
another process with another thread count.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core.config import ConfigError
from deltatune.methods import lora_eva, lora_init
from deltatune.quant import Linear4bit, quantize_nf4, dequantize_nf4

from conftest import make_tiny_llama
from test_cli import chats, model_dir  # noqa: F401 (fixtures)

ALL = "all-linear"


def _perturb(model, name="default", seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            tensor.add_(torch.randn(tensor.shape, generator=g) * 0.05)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bad, match", [
    ({"init_lora_weights": "pisa"}, "init_lora_weights must be"),
    ({"init_lora_weights": "pissa_niter_0"}, "at least 1"),
    ({"init_lora_weights": "loftq"}, "needs loftq_config"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 0}}, "loftq_iter must be"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}}, "loftq_bits must be 4"),
    ({"init_lora_weights": "loftq", "loftq_config": {"bits": 4}}, "unknown key 'bits'"),
    ({"init_lora_weights": "olora", "loftq_config": {"loftq_bits": 4}}, "loftq_config is used by"),
    ({"init_lora_weights": "pissa", "eva_config": {"rho": 2.0}}, "eva_config is used by"),
    ({"init_lora_weights": "pissa", "use_dora": True}, "use_dora"),
])
def test_config_validation_names_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        dt.LoraConfig(r=4, **bad)


def test_inits_from_yaml_flags_and_python(tmp_path):
    from deltatune.train.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("adapter: {peft_type: LORA, r: 4, init_lora_weights: loftq, loftq_config: {loftq_bits: 4, loftq_iter: 2}}\n")
    assert load_config(path).adapter_config().loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    flags = load_config(None, ["--adapter.init_lora_weights", "pissa_niter_4"]).adapter_config()
    assert flags.init_lora_weights == "pissa_niter_4"
    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_config(None, ["--adapter.init_lora_weights", "corda"]).adapter_config()
    config = dt.LoraConfig(r=4, init_lora_weights="olora")
    assert dt.LoraConfig.from_dict(config.to_dict()) == config


def test_pissa_and_olora_formulas_and_the_base_function_at_start(input_ids):
    base = make_tiny_llama()
    reference = _logits(base, input_ids)
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for init in ("pissa", "olora", "pissa_niter_2"):
        model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=4, lora_alpha=2, target_modules=ALL, init_lora_weights=init))
        delta = model.model.layers[0].self_attn.q_proj.deltas["default"]
        A, B, s = delta.lora_A.weight, delta.lora_B.weight, delta.scaling
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
            torch.testing.assert_close((s * B @ A).double(), U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
        if init == "olora":
            Q, R = torch.linalg.qr(weight.double())
            torch.testing.assert_close(B.double(), Q[:, :4], atol=1e-6, rtol=0)
            torch.testing.assert_close(A.double(), R[:4], atol=1e-6, rtol=0)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)  # W itself is kept
        torch.testing.assert_close(_logits(model, input_ids), reference, atol=1e-5, rtol=0)


def test_pissa_niter_is_seeded_per_layer_so_it_reproduces():
    config = dt.LoraConfig(r=4, target_modules=ALL, init_lora_weights="pissa_niter_1")
    torch.manual_seed(0)
    one = dt.adapter_tensors(dt.attach(make_tiny_llama(), config), "default")
    torch.manual_seed(1)
    two = dt.adapter_tensors(dt.attach(make_tiny_llama(), config), "default")
    assert all(torch.equal(v, two[k]) for k, v in one.items())


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", False), ("pissa_niter_4", True)])
def test_pissa_olora_file_is_a_rank_2r_lora_peft_loads_on_the_original_base(tmp_path, input_ids, init, rslora):
    from peft import PeftModel

    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=init, use_rslora=rslora)
    model = dt.attach(make_tiny_llama(), config)
    _perturb(model)  # as if trained
    trained = _logits(model, input_ids)
    dt.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, input_ids), trained, atol=1e-4, rtol=0)
    ours = dt.load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(ours, input_ids), trained, atol=1e-5, rtol=0)
    dt.merge(model)  # merged = unmerged: W + s·(BA − B0A0)
    torch.testing.assert_close(_logits(model, input_ids), trained, atol=1e-5, rtol=0)


def test_loftq_quantizes_the_base_and_starts_closer_than_nf4(input_ids):
    base = make_tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    config = dt.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    model = dt.attach(base, config)
    assert model.deltatune_quantization["name"] == "loftq-nf4"
    for name, weight in weights.items():
        site = model.get_submodule(name)
        assert isinstance(site.base_layer, Linear4bit)
        start = site.base_layer.dequantize_weight() + site.deltas["default"].delta_weight()
        stock = dequantize_nf4(quantize_nf4(weight, blocksize=64, double_quant=False), torch.float32)
        assert (weight - start).norm() < (weight - stock).norm(), name
    with pytest.raises(ConfigError, match="adapters already attached"):
        dt.attach(model, config, "second")
    quantized = make_tiny_llama()
    from deltatune.quant import quantize_model

    quantize_model(quantized, compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match="full-precision"):
        dt.attach(quantized, config)


def test_pissa_on_a_quantized_base_is_refused_naming_the_layer():
    from deltatune.quant import quantize_model

    model = make_tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match="is quantized"):
        dt.attach(model, dt.LoraConfig(r=4, target_modules=ALL, init_lora_weights="pissa"))


REBUILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, "tests")
import deltatune as dt
from deltatune.methods.lora_init import base_digest
from conftest import make_tiny_llama
from test_cli import chats, model_dir  # noqa: F401 (fixtures)
model = dt.load_adapter(make_tiny_llama(), sys.argv[2])
ids = torch.arange(24).view(2, 12)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(base_digest(model))
"""


@pytest.mark.parametrize("init, loftq", [("loftq", {"loftq_bits": 4, "loftq_iter": 2}),
                                         ("pissa", {"loftq_bits": 4, "loftq_iter": 2})])
def test_4bit_start_file_rebuilds_the_same_nf4_codes_from_the_original_weights(tmp_path, init, loftq):
    """Trained with 1 thread here; rebuilt in a fresh process with 2 threads: same codes, same logits."""
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=init, loftq_config=loftq)
    model = dt.attach(make_tiny_llama(), config)
    _perturb(model)
    digest = lora_init.base_digest(model)
    dt.save_adapter(model, tmp_path / "adapter")
    from deltatune.commands import quantize_for, recorded_base_quantization

    recorded = recorded_base_quantization(tmp_path / "adapter")
    assert recorded == ("loftq-nf4" if init == "loftq" else "qpissa-nf4") and quantize_for(recorded) is None
    out = subprocess.run([sys.executable, "-c", REBUILD, "2", str(tmp_path / "adapter"), str(tmp_path / "logits.pt")],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True)
    assert out.stdout.split()[-1] == digest
    with torch.no_grad():
        expected = model(torch.arange(24).view(2, 12)).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_replace_lora_weights_loftq_on_the_stock_nf4_base(tmp_path, model_dir, input_ids):  # noqa: F811
    """peft's replace form: the base untouched, the start closer to W than the stock NF4 base; the file is a
    plain LoRA that loads onto the stock NF4 base with the same logits; a callback returning False rolls back."""
    from deltatune.models import load_model
    from deltatune.quant.load import read_safetensors

    model, _ = load_model(str(model_dir), quantize="nf4", compute_dtype=torch.float32)
    codes = {n: m.weight_nf4.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    full = dict(read_safetensors(next(Path(model_dir).glob("*.safetensors"))))
    refused = "model.layers.0.mlp.down_proj"
    done = dt.replace_lora_weights_loftq(model, callback=lambda m, name: name != refused)
    assert len(done) == 13 and refused not in done
    for name, weight in codes.items():
        site = model.get_submodule(name)
        assert torch.equal(site.base_layer.weight_nf4, weight)  # the base is untouched
        error = full[f"{name}.weight"] - site.base_layer.dequantize_weight()
        after = error - site.deltas["default"].delta_weight()
        assert (after.norm() < error.norm()) if name != refused else torch.equal(after, error), name
    dt.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    fresh, _ = load_model(str(model_dir), quantize="nf4", compute_dtype=torch.float32)
    dt.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh, input_ids), _logits(model, input_ids), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no LoRA layer on a 4-bit base"):
        dt.replace_lora_weights_loftq(dt.attach(make_tiny_llama(), dt.LoraConfig(r=4)))


def test_cli_loftq_train_eval_generate_merge_rebuild_the_base(tmp_path, model_dir, chats, capsys):  # noqa: F811
    """`deltatune train` with LoftQ from flags; eval/generate (--quantize auto: the full-precision base, the file
    rebuilds Q_T) and merge (Q_T + the trained delta, written in fp32) equal the rebuilt model."""
    from transformers import AutoModelForCausalLM

    from test_cli import run as run_cli

    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--model", str(model_dir), "--data.train", str(chats), "--max_steps", "2",
                                 "--batch_size", "2", "--output_dir", str(out), "--optim.lr", "1e-2",
                                 "--adapter.r", "4", "--adapter.lora_alpha", "8", "--precision", "fp32",
                                 "--adapter.init_lora_weights", "loftq", "--adapter.loftq_config.loftq_bits", "4",
                                 "--adapter.loftq_config.loftq_iter", "2"], capsys)
    assert code == 0, err
    assert "quantized base: 14 linear layers" in stdout
    adapter = out / "adapter"
    code, stdout, err = run_cli(["eval", "--base", str(model_dir), "--adapter", str(adapter), "--data", str(chats),
                                 "--max-new-tokens", "3", "--precision", "fp32"], capsys)
    assert code == 0 and "perplexity" in stdout, err
    code, _, err = run_cli(["generate", "--base", str(model_dir), "--adapter", str(adapter), "--prompt", "the cat",
                            "--max-new-tokens", "3", "--threads", "1"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", "--base", str(model_dir), "--adapter", str(adapter), "--out",
                            str(tmp_path / "merged")], capsys)
    assert code == 0, err
    rebuilt = dt.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(6, 22, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged, ids), _logits(rebuilt, ids), atol=1e-5, rtol=1e-5)


def test_eva_prepass_sets_A_to_the_principal_components_of_the_layer_inputs(input_ids):
    from deltatune.train.prepass import local_data

    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in input_ids]
    config = dt.LoraConfig(r=3, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights="eva")
    model = dt.attach(make_tiny_llama(), config)
    base = _logits(make_tiny_llama(), input_ids)
    lora_eva.eva_prepass(model, config, "default", local_data(examples))
    torch.testing.assert_close(_logits(model, input_ids), base, atol=0, rtol=0)  # B = 0: the base exactly
    inputs = {}
    layer = model.model.layers[1]
    handle = layer.mlp.down_proj.base_layer.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    _logits(model, input_ids)
    handle.remove()
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1]).double()
    _, _, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    A = layer.mlp.down_proj.deltas["default"].lora_A.weight.double()
    torch.testing.assert_close((A @ Vh[:3].T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0)
    assert (A.gather(1, A.abs().argmax(1, keepdim=True)) > 0).all()  # sklearn's sign convention
    q, k = layer.self_attn.q_proj.deltas["default"], layer.self_attn.k_proj.deltas["default"]
    assert torch.equal(q.lora_A.weight, k.lora_A.weight)  # one input, one decomposition
    with pytest.raises(ConfigError, match="needs training data"):
        lora_eva.eva_prepass(model, config, "default", local_data([]))
    for bad, match in (({"rho": 2.0}, "rank redistribution"), ({"whiten": True}, "whiten"), ({"tau": 2}, "tau")):
        with pytest.raises(ConfigError, match=match):
            dt.LoraConfig(r=3, init_lora_weights="eva", eva_config=bad)


def test_train_with_eva_runs_the_prepass_and_writes_a_plain_lora(tmp_path, model_dir, chats, capsys):  # noqa: F811
    from test_cli import run as run_cli

    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--model", str(model_dir), "--data.train", str(chats), "--max_steps", "1",
                                 "--batch_size", "2", "--output_dir", str(out), "--adapter.r", "2",
                                 "--precision", "fp32", "--adapter.init_lora_weights", "eva"], capsys)
    assert code == 0, err
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["r"] == 2
