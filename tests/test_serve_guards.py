"""One client cannot stall the others: bounded bodies, work off the event loop, timeouts, a connection cap,
atomic adapter replacement, validated blends, fields refused by name, access log, metrics, draining.

Every client here is a small loopback socket with its own timeout; no test asserts a timing."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request

import pytest

import deltatune as dt
from deltatune.serve import Engine
from deltatune.serve.guards import Limits
from deltatune.serve.registry import AdapterRegistry
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, running_server, tiny_llama

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from deltatune.serve.server import Server  # noqa: E402

ADMIN = "admin-secret"
LIMITS = Limits(max_body_bytes=4096, max_connections=8, request_timeout=0.5, keep_alive=0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    reference = tiny_llama()
    for i, name in enumerate(("l1", "l2", "l3")):
        add_lora(reference, name, r=4, seed=300 + i)
        dt.save_adapter(reference, root / name, name)
    add_lora(reference, "outside", r=2, seed=9)
    dt.save_adapter(reference, elsewhere / "outside", "outside")
    (root / "link").symlink_to(elsewhere / "outside")  # a symlink out of the adapter directory
    full = tiny_llama()
    dt.attach(full, dt.FullConfig(target_modules=["mlp"]), "full")
    dt.save_adapter(full, root / "full", "full")
    model = tiny_llama()
    server = Server(Engine(model, byte_tokenizer()), AdapterRegistry(model, adapter_dirs=[root]), base_name="tiny",
                    admin_token=ADMIN, limits=LIMITS)
    holder: dict = {}
    with running_server(server, holder) as url:
        host, port = url.removeprefix("http://").split(":")
        yield {"url": url, "addr": (host, int(port)), "server": server, "root": root, "reference": reference,
               "tok": byte_tokenizer()}


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key="none", max_retries=0, timeout=30)


def _send(setup, data: bytes, *, read: bool = True) -> bytes:
    """Send raw bytes on a new connection and read the reply until the server closes it (bounded)."""
    with socket.create_connection(setup["addr"], timeout=10) as sock:
        sock.sendall(data)
        if not read:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _post(setup, path: str, body: dict, token: str | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(setup["url"] + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


def _metrics(setup) -> str:
    return urllib.request.urlopen(setup["url"] + "/metrics", timeout=10).read().decode()


def test_a_declared_body_over_the_limit_gets_413_before_it_is_sent(setup):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
    reply = _send(setup, head)  # the 20 MB body is never sent: the answer comes from the headers alone
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply


def test_a_chunked_body_over_the_limit_gets_413(setup):
    chunk = b"x" * 3000
    data = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
            (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    reply = _send(setup, data)
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply


def test_half_sent_requests_and_idle_connections_time_out(setup):
    assert _send(setup, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le").startswith(b"HTTP/1.1 408")
    half_body = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":"
    assert _send(setup, half_body).startswith(b"HTTP/1.1 408")
    assert _send(setup, b"").startswith(b"HTTP/1.1 408")  # connected, never wrote a byte
    assert 'deltatune_rejected_requests_total{code="request_timeout",status="408"}' in _metrics(setup)


def test_connections_beyond_the_cap_get_503_and_others_are_served_after(setup):
    held = [socket.create_connection(setup["addr"], timeout=10) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.05)  # let the server accept them
        assert _send(setup, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while b"200 OK" not in _send(setup, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert 'deltatune_rejected_requests_total{code="too_many_connections",status="503"}' in _metrics(setup)


def _send_from(source: str, addr, data: bytes) -> bytes:
    """_send from another loopback address (Linux routes all of 127/8 to lo): another client to the server."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(addr)
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_one_client_beyond_its_own_cap_gets_503_while_another_client_is_served(tmp_path):
    with pytest.raises(ValueError, match="max_connections_per_client"):
        Limits(max_connections_per_client=0)
    model = tiny_llama()
    limits = Limits(max_connections=8, max_connections_per_client=3, request_timeout=5, keep_alive=0.5)
    server = Server(Engine(model, byte_tokenizer()), AdapterRegistry(model, adapter_dirs=[tmp_path]), base_name="tiny",
                    limits=limits)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with running_server(server) as url:
        host, port = url.removeprefix("http://").split(":")
        addr = (host, int(port))
        held = [socket.create_connection(addr, timeout=10) for _ in range(3)]  # client 127.0.0.1 at its cap
        try:
            time.sleep(0.05)  # let the server accept them
            refused = _send_from("127.0.0.1", addr, health)
            assert refused.startswith(b"HTTP/1.1 503") and b"too_many_client_connections" in refused
            assert b"200 OK" in _send_from("127.0.0.2", addr, health)  # another client: served
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while b"200 OK" not in _send_from("127.0.0.1", addr, health):  # its connections closed: served again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        assert 'deltatune_rejected_requests_total{code="too_many_client_connections",status="503"}' in metrics


def test_tokenizing_runs_off_the_event_loop(setup, client, monkeypatch):
    engine, release, results = setup["server"].engine, threading.Event(), {}
    encode = engine.encode

    def slow_encode(prompt, **kwargs):  # holds until the test has been answered on another connection
        if prompt == "slow":
            assert release.wait(20), "the event loop was blocked while a prompt tokenized"
        return encode(prompt, **kwargs)

    monkeypatch.setattr(engine, "encode", slow_encode)
    slow = threading.Thread(target=lambda: results.setdefault("slow", client.completions.create(
        model="tiny", prompt="slow", max_tokens=2, temperature=0)))
    slow.start()
    time.sleep(0.1)
    results["other"] = client.completions.create(model="tiny", prompt="fast", max_tokens=2, temperature=0)
    release.set()
    slow.join(30)
    assert results["slow"].choices[0].text is not None and "slow" in results


def test_admin_load_over_a_loaded_name_replaces_it_atomically(setup, tmp_path):
    registry = setup["server"].registry
    ids = setup["tok"]("swap adapters under one name, with a prompt of blocks", add_special_tokens=False)["input_ids"]
    old = registry.acquire("l1")  # a request in flight on l1, whose prompt's blocks are in the prefix cache
    setup["server"].engine.generate([ids], [old], max_new_tokens=2)
    status, body = _post(setup, "/admin/adapters", {"name": "l1", "path": "l2"}, token=ADMIN)
    assert status == 200
    new = registry.entries["l1"].internal
    assert new != old and old in dt.adapters(registry.model)  # the old one serves its request to the end
    registry.release(old)
    assert old not in dt.adapters(registry.model)
    ids = setup["tok"]("swap adapters under one name, with a prompt of blocks", add_special_tokens=False)["input_ids"]
    out = setup["server"].engine.generate([ids], [new], max_new_tokens=5)[0].token_ids
    assert out == hf_greedy(setup["reference"], ids, "l2", 5)  # new requests get the new file...
    again = setup["server"].engine.generate([ids], [old_after := registry.acquire("l1")], max_new_tokens=5)[0]
    registry.release(old_after)
    assert again.token_ids == out  # ...and its own cached prefix, never the old adapter's
    status, body = _post(setup, "/admin/adapters", {"name": "tiny", "path": "l2"}, token=ADMIN)
    assert status == 409 and body["error"]["param"] == "name"  # the base model's name is not an adapter's
    status, body = _post(setup, "/v1/load_lora_adapter", {"lora_name": "l1", "lora_path": "l1"}, token=ADMIN)
    assert status == 200 and "Success" in body  # vLLM's endpoint, same guarded path
    assert _post(setup, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "l1"})[0] == 401
    status, body = _post(setup, "/v1/unload_lora_adapter", {"lora_name": "l1"}, token=ADMIN)
    assert status == 200 and "l1" not in registry.entries


@pytest.mark.parametrize("extra, param", [
    (dict(model="l2:inf+l3:0.5"), "model"), (dict(model="l2:nan"), "model"),
    (dict(extra_body={"adapters": {"l2": "x"}}), "adapters"),
    (dict(extra_body={"adapters": ["l2"]}), "adapters"),
])
def test_blend_weights_are_validated(client, extra, param):
    for temperature in (0, 1):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": temperature,
                                         **extra})
        assert err.value.body["param"] == param


def test_an_infinite_blend_weight_in_json_is_refused(setup):
    raw = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "adapters": {"l2": Infinity}}'  # Python's json reads it
    request = urllib.request.Request(setup["url"] + "/v1/completions", data=raw, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == "adapters"


def test_models_lists_neither_symlinks_out_of_the_directory_nor_blends(setup, client):
    client.completions.create(model="l2:0.5+l3:0.5", prompt="hi", max_tokens=2, temperature=0)
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "l2", "l3"} <= ids and "link" not in ids and not any(i.startswith("blend_") for i in ids)


def test_errors_name_the_adapter_as_the_client_does(client):
    with pytest.raises(openai.BadRequestError) as err:  # full fine-tuning: refused when it loads
        client.completions.create(model="full", prompt="hi", max_tokens=2)
    assert "'full'" in err.value.body["message"] and "srv_" not in err.value.body["message"]


def test_a_full_adapter_is_refused_at_start(setup, tmp_path):
    model = tiny_llama()
    registry = AdapterRegistry(model, check=Engine(model, byte_tokenizer()).check_adapter)
    with pytest.raises(dt.serve.RequestError, match="'x'.*in place"):
        registry.add("x", setup["root"] / "full")
    assert not dt.adapters(model) and "x" not in registry.entries


@pytest.mark.parametrize("extra, param", [
    (dict(extra_body={"max_token": 3}), "max_token"), (dict(echo=True), "echo"), (dict(suffix="end"), "suffix"),
    (dict(logit_bias={"5": 10}), "logit_bias"), (dict(extra_body={"tools": [{"type": "function"}]}), "tools"),
    (dict(best_of=3), "best_of"),
])
def test_fields_that_would_change_the_output_are_refused_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra})
    assert err.value.body["param"] == param


def test_fields_that_change_nothing_are_accepted(client):
    plain = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0).choices[0].text
    same = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0, user="u1", echo=False,
                                     best_of=1, extra_body={"service_tier": "auto"}).choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, metadata={"k": "v"}, store=False, user="u1")
    assert same == plain and chat.choices[0].message.content is not None


def test_rejections_are_counted_and_every_request_is_logged(setup, client, caplog):
    with caplog.at_level(logging.INFO, logger="deltatune.serve.access"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "deltatune.serve.access"]
    assert any('"POST /v1/completions" 404' in line for line in lines)
    assert any('"POST /v1/completions" 200' in line for line in lines)
    assert 'deltatune_rejected_requests_total{code="model_not_found",status="404"}' in _metrics(setup)
    assert "deltatune_prefix_cache_bytes " in _metrics(setup)


def test_tokenize_and_detokenize(setup):
    status, body = _post(setup, "/tokenize", {"model": "tiny", "prompt": "hello"})
    assert status == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == 128
    assert _post(setup, "/detokenize", {"model": "tiny", "tokens": body["tokens"]})[1]["prompt"].endswith("hello")
    status, chat = _post(setup, "/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat["count"] > 3
    assert _post(setup, "/detokenize", {"tokens": [10**6]})[0] == 400


def test_shutdown_drains_running_requests_then_stops(caplog):
    model = tiny_llama()
    server = Server(Engine(model, byte_tokenizer()), AdapterRegistry(model), base_name="tiny", limits=LIMITS)
    holder: dict = {}
    with caplog.at_level(logging.WARNING, logger="deltatune.serve"):
        with running_server(server, holder) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
            stream = client.completions.create(model="tiny", prompt="drain", max_tokens=60, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            pieces = [next(iter(stream))]
            holder["uvicorn"].should_exit = True  # what SIGTERM sets
            pieces += list(stream)
            assert pieces[-1].choices[0].finish_reason == "length"  # the running request finished
    assert any("shut down" in r.getMessage() for r in caplog.records)
