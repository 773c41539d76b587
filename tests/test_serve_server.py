"""The OpenAI-compatible server, end to end: a real uvicorn server on a free port, the official openai client."""
from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request

import pytest
import torch

import deltatune as dt
from deltatune.serve import Engine
from deltatune.serve.registry import AdapterRegistry
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, running_server, tiny_llama

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
from deltatune.serve.server import Server  # noqa: E402

ADAPTERS = [f"ad{i}" for i in range(16)]
KEY, ADMIN = "sk-test", "admin-secret"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    reference = tiny_llama()
    for i, name in enumerate(ADAPTERS):
        add_lora(reference, name, r=2 + 2 * (i % 4), seed=100 + i)
        dt.save_adapter(reference, root / name, name)
    (root / "outside").mkdir()
    tok = byte_tokenizer()
    model = tiny_llama()
    registry = AdapterRegistry(model, adapter_dirs=[root])
    registry.add("named", root / "ad0", pin=True)
    server = Server(Engine(model, tok, max_batch_size=64), registry, base_name="tiny", api_key=KEY, admin_token=ADMIN)
    with running_server(server) as url:
        yield {"url": url, "tok": tok, "reference": reference, "server": server, "root": root}


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _expected(setup, prompt: str, adapter: str | None, n: int) -> tuple[str, int]:
    ids = setup["tok"](prompt, add_special_tokens=False)["input_ids"]
    out = hf_greedy(setup["reference"], ids, adapter, n)
    eos = setup["reference"].generation_config.eos_token_id
    out = out[: out.index(eos) + 1] if eos in out else out
    return setup["tok"].decode(out, skip_special_tokens=True), len(out)


def _raw(setup, method: str, path: str, body: bytes | None = None, token: str | None = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(setup["url"] + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_models_lists_the_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and set(ADAPTERS) | {"named", "tiny"} == set(ids)


def test_completion_equals_greedy_generation_alone(setup, client):
    out = client.completions.create(model="ad3", prompt="hello there", max_tokens=10, temperature=0)
    text, n = _expected(setup, "hello there", "ad3", 10)
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, n, 11 + n)
    base = client.completions.create(model="tiny", prompt="hello there", max_tokens=10, temperature=0)
    assert base.choices[0].text == _expected(setup, "hello there", None, 10)[0]


def test_streaming_gives_the_same_text(setup, client):
    full = client.completions.create(model="ad5", prompt="stream me", max_tokens=12, temperature=0)
    pieces = list(client.completions.create(model="ad5", prompt="stream me", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == full.choices[0].text
    assert pieces[-1].usage.completion_tokens == full.usage.completion_tokens
    chat = dict(model="ad6", messages=[{"role": "user", "content": "hi"}], max_tokens=9, temperature=0)
    reply = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_chat_uses_the_template(setup, client):
    reply = client.chat.completions.create(model="ad1", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    prompt = setup["tok"].apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert reply.choices[0].message.content == _expected(setup, prompt, "ad1", 8)[0]
    assert reply.usage.prompt_tokens == len(setup["tok"](prompt, add_special_tokens=False)["input_ids"])


def test_seeded_sampling_and_stop(client):
    kwargs = dict(model="ad2", prompt="abc", max_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text
    full = client.completions.create(model="ad2", prompt="abc", max_tokens=10, temperature=0).choices[0].text
    cut = client.completions.create(model="ad2", prompt="abc", max_tokens=10, temperature=0, stop=[full[4:6]])
    assert cut.choices[0].text == full[: full.find(full[4:6])] and cut.choices[0].finish_reason == "stop"


def test_blends_by_name_and_by_extra_body(setup, client):
    by_name = client.completions.create(model="ad1:0.5+ad2:0.5", prompt="mix", max_tokens=6, temperature=0)
    by_body = client.completions.create(model="tiny", prompt="mix", max_tokens=6, temperature=0,
                                        extra_body={"adapters": {"ad2": 0.5, "ad1": 0.5}})
    assert by_name.choices[0].text == by_body.choices[0].text
    single = client.completions.create(model="ad1:1.0", prompt="mix", max_tokens=6, temperature=0)
    assert single.choices[0].text == client.completions.create(model="ad1", prompt="mix", max_tokens=6,
                                                               temperature=0).choices[0].text


@pytest.mark.parametrize("kwargs, error, code", [
    (dict(model="nope"), openai.NotFoundError, "model_not_found"),
    (dict(model="../etc"), openai.NotFoundError, "model_not_found"),
    (dict(prompt="x" * 200), openai.BadRequestError, "context_length_exceeded"),
    (dict(max_tokens=-1), openai.BadRequestError, None),
    (dict(max_tokens=10**9), openai.BadRequestError, "context_length_exceeded"),
    (dict(temperature=5), openai.BadRequestError, None),
    (dict(n=17), openai.BadRequestError, None),
    (dict(model="ad1:0.5+zz:0.5"), openai.NotFoundError, "model_not_found"),
    (dict(stream=True, stream_options=[1]), openai.BadRequestError, None),
])
def test_bad_requests_get_openai_errors(client, kwargs, error, code):
    with pytest.raises(error) as err:
        client.completions.create(**{"model": "ad0", "prompt": "hi", "max_tokens": 4, **kwargs})
    assert err.value.body["type"] == "invalid_request_error" and err.value.code == code
    assert err.value.body["message"]


def test_malformed_json_wrong_key_and_admin(setup):
    status, body = _raw(setup, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _raw(setup, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400
    status, body = _raw(setup, "GET", "/v1/models", token="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _raw(setup, "GET", "/health", token=None)[0] == 200
    load = json.dumps({"name": "late", "path": "ad7"}).encode()
    assert _raw(setup, "POST", "/admin/adapters", load, token=KEY)[0] == 401  # the API key is not the admin token
    status, body = _raw(setup, "POST", "/admin/adapters", load, token=ADMIN)
    assert status == 200 and body["bytes"] > 0
    for path, expected in (("../ad7", 403), ("/etc", 403), ("outside", 404)):
        bad = json.dumps({"name": "x", "path": path}).encode()
        assert _raw(setup, "POST", "/admin/adapters", bad, token=ADMIN)[0] == expected, path
    assert _raw(setup, "DELETE", "/admin/adapters/late", token=ADMIN)[0] == 200
    assert _raw(setup, "DELETE", "/admin/adapters/late", token=ADMIN)[0] == 404


def test_admin_is_off_without_a_token(setup):
    server = setup["server"]
    plain = Server(server.engine, server.registry, metrics=server.metrics)  # routes only; never started
    assert not any(getattr(r, "path", "").startswith("/admin") for r in plain.app().routes)


def test_disconnect_mid_stream_frees_the_slot(setup):
    host, port = setup["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "ad4", "prompt": "long", "max_tokens": 100, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    engine = setup["server"].engine
    deadline = time.monotonic() + 20
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the aborted request still holds its slot"
        time.sleep(0.05)
    metrics = urllib.request.urlopen(setup["url"] + "/metrics").read().decode()
    assert 'deltatune_requests_total{adapter="ad4",outcome="abort"} 1.0' in metrics


def test_metrics(setup, client):
    for _ in range(2):  # loaded by the first request, a cache hit for the second
        client.completions.create(model="ad9", prompt="count me", max_tokens=3, temperature=0)
    text = urllib.request.urlopen(setup["url"] + "/metrics").read().decode()
    for line in ('deltatune_requests_total{adapter="ad9",outcome="length"}',
                 'deltatune_generation_tokens_total{adapter="ad9"} 6.0',
                 'deltatune_time_to_first_token_seconds_count{adapter="ad9"}',
                 'deltatune_adapter_loads_total{adapter="ad9"} 1.0', 'deltatune_adapter_bytes{adapter="ad9"}',
                 "deltatune_queue_length 0.0", "deltatune_adapters_resident ", "deltatune_adapters_resident_bytes ",
                 'deltatune_adapter_cache_hits_total{adapter="ad9"} 1.0'):
        assert line in text, line


def test_64_concurrent_clients_over_16_adapters(setup):
    names = [ADAPTERS[i % 16] if i % 5 else "tiny" for i in range(64)]
    prompts = [f"request {i}: " + "xyz"[: i % 3] * (i % 7) for i in range(64)]
    lengths = [4 + i % 9 for i in range(64)]

    async def run():
        client = openai.AsyncOpenAI(base_url=setup["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        calls = [client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
                 for m, p, n in zip(names, prompts, lengths)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(run())
    for out, name, prompt, n in zip(outs, names, prompts, lengths):
        assert out.choices[0].text == _expected(setup, prompt, None if name == "tiny" else name, n)[0], (name, prompt)
