"""`deltatune serve`: flags, one-line errors, and a real server process answering the openai client."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import deltatune as dt
from deltatune.cli import build_parser, main
from deltatune.serve.cli import byte_size
from serve_helpers import add_lora, byte_tokenizer, tiny_llama


def test_sizes_and_flags():
    assert byte_size("512MB") == 512 * 10**6 and byte_size("2GiB") == 2 * 2**30 and byte_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError, match="--max-adapter-memory"):
        byte_size("lots")
    args = build_parser().parse_args(["serve", "--adapter", "a=x/y", "--adapter", "b=z", "--pin", "a", "--port", "9"])
    assert args.adapter == [("a", "x/y"), ("b", "z")] and args.pin == ["a"] and args.port == 9


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--adapter", "no-equals-sign"])
    assert exit_.value.code == 2 and "--adapter takes NAME=PATH" in capsys.readouterr().err


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cli")
    model = tiny_llama()
    model.save_pretrained(root / "tiny")
    byte_tokenizer().save_pretrained(root / "tiny")
    add_lora(model, "a", 4, seed=1)
    dt.save_adapter(model, root / "adapters" / "helper", "a")
    return root


def test_missing_adapter_is_a_one_line_error(base_dir, capsys):
    code = main(["serve", "--base", str(base_dir / "tiny"), "--adapter", f"x={base_dir / 'nowhere'}",
                 "--precision", "fp32", "--threads", "1"])
    assert code == 2 and "error: --adapter x=" in capsys.readouterr().err


def test_serve_process_answers_the_openai_client(base_dir):
    openai = pytest.importorskip("openai")
    for module in ("uvicorn", "starlette", "prometheus_client"):
        pytest.importorskip(module)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deltatune.cli", "serve", "--base", str(base_dir / "tiny"), "--adapter-dir",
           str(base_dir / "adapters"), "--port", str(port), "--precision", "fp32", "--threads", "1",
           "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not start in 90 s"
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "helper"]
        out = client.completions.create(model="helper", prompt="hi", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
        proc.terminate()  # SIGTERM: drains (nothing running here), says so, exits
        log = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode in (0, -15), log  # uvicorn re-raises the signal once drained
        assert "accepting no new requests" in log and "shut down" in log, log
        assert '"POST /v1/completions" 200' in log  # the access log: one line per request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


# ---- --quantize: a 4-bit NF4 base ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nf4_adapter(base_dir):
    """An adapter trained (here: attached) on the NF4 base: its file records deltatune_base_quantization."""
    from deltatune.quant import quantize_model

    model = tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    add_lora(model, "q", 4, seed=3)
    dt.save_adapter(model, base_dir / "qlora", "q")
    return base_dir / "qlora"


def test_quantize_flag_and_auto_follow_the_adapters_files(base_dir, nf4_adapter, capsys):
    from deltatune.serve.cli import base_quantization

    parse = lambda *argv: build_parser().parse_args(["serve", *argv])  # noqa: E731
    assert parse().quantize == "auto" and base_quantization(parse()) is None  # no adapter: full precision
    assert base_quantization(parse("--quantize", "nf4")) == "nf4"
    assert base_quantization(parse("--quantize", "none", "--adapter", f"q={nf4_adapter}")) is None
    assert base_quantization(parse("--adapter", f"q={nf4_adapter}")) == "nf4"
    assert "trained on an NF4 base" in capsys.readouterr().err
    plain = base_dir / "adapters" / "helper"
    assert base_quantization(parse("--adapter", f"q={nf4_adapter}", "--adapter", f"h={plain}")) is None  # mixed
    with pytest.raises(SystemExit):
        parse("--quantize", "int4")


def test_serve_quantize_nf4_loads_a_4bit_base_the_engine_serves(base_dir, nf4_adapter, monkeypatch):
    """serve_main up to uvicorn's Server.run: the base loads in NF4 with the adapter, and the engine's greedy tokens
    equal transformers' generate() on that same 4-bit model."""
    import uvicorn

    import deltatune.serve.engine as engine_module
    from deltatune.quant import is_quantized_model
    from serve_helpers import hf_greedy

    engines = []

    class Recorded(engine_module.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(engine_module, "Engine", Recorded)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: None)
    code = main(["serve", "--base", str(base_dir / "tiny"), "--adapter", f"q={nf4_adapter}", "--precision", "fp32",
                 "--threads", "1"])
    assert code in (0, None) and len(engines) == 1
    engine = engines[0]
    assert is_quantized_model(engine.model)
    prompt = byte_tokenizer()("hello there")["input_ids"]
    [name] = dt.adapters(engine.model)  # the registry's internal name for "q"
    out = engine.generate([prompt, prompt], [name, None], max_new_tokens=5)
    assert [o.token_ids for o in out] == [hf_greedy(engine.model, prompt, n, 5) for n in (name, None)]
    assert out[0].token_ids != out[1].token_ids
