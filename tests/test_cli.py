"""The command line, in process (`main([...])`), on a tiny Llama saved with a word-level tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import deltatune as dt
from deltatune.cli import main

from conftest import make_tiny_llama

WORDS = "the a cat dog sat ran on under mat log red blue big small and then".split()
SPECIALS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
TINY_LORA = ["--adapter.r", "4", "--adapter.lora_alpha", "8", "--precision", "fp32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved transformers directory: the tiny random Llama and a word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                        additional_special_tokens=SPECIALS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"the {a} sat"}, {"role": "assistant", "content": f"on the {b}"}]}
            for a in ("cat", "dog") for b in ("mat", "log", "red mat")]
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help exits 0, a usage error 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("info", "inspect", "merge", "generate", "train", "eval", "demo"):
        assert command in out
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0 and "--section.key" in out


def test_info_on_a_saved_model_dir(model_dir, capsys):
    code, out, _ = run(["info", str(model_dir)], capsys)
    assert code == 0
    assert "LlamaForCausalLM" in out and "q_proj" in out and "output head, excluded from all-linear" in out


def test_inspect_an_adapter_dir(tmp_path, capsys):
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    dt.save_adapter(model, tmp_path / "adapter")
    code, out, _ = run(["inspect", str(tmp_path / "adapter")], capsys)
    assert code == 0
    assert "LORA" in out and "r            4" in out and "4 adapted" in out and "written by   deltatune" in out
    assert "readable by  peft, vLLM, deltatune" in out


def test_inspect_names_deltatune_only_methods(tmp_path, capsys):
    model = dt.attach(make_tiny_llama(), dt.BottleneckConfig())
    dt.save_adapter(model, tmp_path / "adapter")
    code, out, _ = run(["inspect", str(tmp_path / "adapter")], capsys)
    assert code == 0 and "BOTTLENECK" in out and "readable by  deltatune\n" in out


@pytest.mark.parametrize("argv, named", [
    (["--optim.lrr", "1e-4"], "optim.lrr"),
    (["--batch_size", "0"], "batch_size"),
    (["--loss_chunk_size", "-1"], "loss_chunk_size"),
    (["--frozen_bf16", "maybe"], "frozen_bf16"),
    (["--optim.lr", "fast"], "optim.lr"),
    (["--adapter.r", "-2"], "r"),
    (["--max_steps"], "--max_steps"),
    (["missing.yaml"], "missing.yaml"),
    (["a.yaml", "b.yaml"], "b.yaml"),
])
def test_train_config_errors_exit_2_naming_the_key(argv, named, capsys):
    code, out, err = run(["train", *argv], capsys)
    assert code == 2, err
    assert err.startswith("deltatune train: error: ") and named in err


def test_train_without_data_names_the_key(tmp_path, model_dir, capsys):
    code, _, err = run(["train", "--model", str(model_dir), "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and "data.train" in err


def test_other_usage_errors_exit_2(tmp_path, capsys):
    assert run(["eval", "--bogus"], capsys)[0] == 2
    code, _, err = run(["eval", "--base", str(tmp_path / "nowhere"), "--data", str(tmp_path / "x.jsonl")], capsys)
    assert code == 2 and "x.jsonl" in err  # the data file is checked before any model loads


def test_train_two_steps_from_yaml_and_flags_then_eval(tmp_path, model_dir, chats, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), "data": {"train": str(chats)}, "max_steps": 5}))
    out_dir = tmp_path / "run"
    code, out, err = run(["train", str(config), "--max_steps", "2", "--batch_size", "2", "--output_dir", str(out_dir),
                          *TINY_LORA], capsys)
    assert code == 0, err
    assert "trained 2 steps" in out
    adapter_config, tensors, _ = dt.read_adapter(out_dir / "adapter")
    assert adapter_config.r == 4 and tensors
    assert (out_dir / "metrics.jsonl").is_file()

    code, out, err = run(["eval", "--base", str(model_dir), "--adapter", str(out_dir / "adapter"), "--data", str(chats),
                          "--max-new-tokens", "4", "--match", "contains"], capsys)
    assert code == 0, err
    assert "perplexity" in out and "contains match" in out and "/6" in out


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, model_dir, capsys):
    out_dir = tmp_path / "demo"
    code, out, err = run(["demo", "--model", str(model_dir), "--steps", "2", "--out", str(out_dir), "--threads", "1"], capsys)
    assert code == 0, err
    summary = json.loads((out_dir / "demo.json").read_text())
    assert summary["steps"] == 2 and summary["held_out"] == 50
    assert set(summary["before"]) >= {"exact", "json", "loss"} and summary["after"]["loss"] > 0
    assert (out_dir / "adapter" / "adapter_config.json").is_file() and (out_dir / "loss.png").is_file()
    assert "exact match, 50 held-out" in out and "sample generations" in out
    assert run(["demo", "--model", str(model_dir), "--steps", "1", "--out", str(out_dir), "--threads", "1"], capsys)[0] == 0  # rerun replaces
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run(["demo", "--model", str(model_dir), "--out", str(tmp_path / "mine")], capsys)
    assert code == 2 and "--out" in err and (tmp_path / "mine" / "notes.txt").exists()
