"""OpenAI features through the server and the official client: logprobs (equal to a local forward's), n > 1
with per-choice seeds, top_k, presence/frequency penalties, response_format with a JSON schema."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.serve import Engine, SamplingParams
from deltatune.serve.registry import AdapterRegistry
from deltatune.serve.sampling import choose
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, running_server, tiny_llama

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from deltatune.serve.server import Server  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    reference = tiny_llama()
    add_lora(reference, "ad", r=4, seed=11)
    dt.save_adapter(reference, root / "ad", "ad")
    model = tiny_llama()
    server = Server(Engine(model, byte_tokenizer()), AdapterRegistry(model, adapter_dirs=[root]), base_name="tiny")
    with running_server(server) as url:
        yield {"client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60),
               "reference": reference, "tok": byte_tokenizer()}


def _forward_logprobs(model, name, ids: list[int]) -> torch.Tensor:
    """log-softmax of a full forward over ids with only adapter `name` active: (len(ids), vocab)."""
    dt.set_active(model, name)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_equal_a_local_forward(setup):
    tok, out = setup["tok"], setup["client"].completions.create(model="ad", prompt="score me", max_tokens=6,
                                                                 temperature=0, logprobs=3)
    prompt = tok("score me")["input_ids"]
    lp = out.choices[0].logprobs
    generated = hf_greedy(setup["reference"], prompt, "ad", 6)  # the engine's greedy tokens (tested elsewhere)
    full = _forward_logprobs(setup["reference"], "ad", prompt + generated)
    for i, (token, value) in enumerate(zip(generated, lp.token_logprobs)):  # top: keyed by text, which may repeat
        assert value == pytest.approx(float(full[len(prompt) - 1 + i, token]), abs=1e-4)
        assert 1 <= len(lp.top_logprobs[i]) <= 3 and max(lp.top_logprobs[i].values()) == pytest.approx(value, abs=1e-4)
    assert len(lp.tokens) == len(generated) - (generated[-1] == 258)


def test_chat_logprobs_and_streaming(setup):
    client = setup["client"]
    kwargs = dict(model="ad", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, logprobs=True,
                  top_logprobs=2)
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4)
               for c in content)  # greedy: the chosen token is the most likely
    streamed = [c for chunk in client.chat.completions.create(**kwargs, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [c.logprob for c in streamed][: len(content)] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_n_choices_have_per_choice_seeds(setup):
    client = setup["client"]
    kwargs = dict(model="ad", prompt="many", max_tokens=8, temperature=1.0)
    out = client.completions.create(**kwargs, n=3, seed=40)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for i, choice in enumerate(out.choices):  # choice i is the request with seed + i, alone
        assert choice.text == client.completions.create(**kwargs, seed=40 + i).choices[0].text
    assert len({c.text for c in out.choices}) > 1
    chunks = list(client.completions.create(**kwargs, n=2, seed=40, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == out.choices[i].text


def test_top_k_one_is_greedy_and_penalties_follow_openais_formula(setup):
    client = setup["client"]
    greedy = client.completions.create(model="ad", prompt="k", max_tokens=8, temperature=0).choices[0].text
    assert client.completions.create(model="ad", prompt="k", max_tokens=8, temperature=1.5, seed=3,
                                     extra_body={"top_k": 1}).choices[0].text == greedy
    logits = torch.tensor([[2.0, 1.9, 1.0, 0.5]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3)
    # tokens 0 and 1 generated twice each: 2.0 - 0.5 - 2 * 0.3 = 0.9, 1.9 - 0.5 - 0.6 = 0.8, below token 2's 1.0
    assert choose(logits, [params], [None], [[0, 0, 1, 1]]) == [2]
    assert choose(logits, [params], [None], [[0, 0]]) == [1]
    assert choose(logits, [SamplingParams()], [None], [[0, 0]]) == [0]
    penalized = client.completions.create(model="ad", prompt="k", max_tokens=8, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalized != greedy


@pytest.mark.parametrize("field, value", [("top_k", -1), ("presence_penalty", 3), ("frequency_penalty", "x"),
                                          ("logprobs", 21)])
def test_bad_feature_values_are_refused_by_name(setup, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        setup["client"].completions.create(model="ad", prompt="x", max_tokens=2, extra_body={field: value})
    assert err.value.body["param"] == field


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                                           "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "city"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_response_format_json_schema_gives_valid_json(setup, temperature):
    client = setup["client"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(model="ad", messages=[{"role": "user", "content": "who?"}],
                                               max_tokens=90, temperature=temperature, seed=seed, response_format=fmt)
        text = reply.choices[0].message.content
        value = json.loads(text)  # a random model, and still valid JSON
        assert set(value) <= set(SCHEMA["properties"]) and {"name", "age", "city"} <= set(value)
        assert isinstance(value["name"], str) and type(value["age"]) is int and value["city"] in ("Paris", "Oslo")
        assert reply.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model="ad", messages=[{"role": "user", "content": "who?"}], max_tokens=40,
                                           temperature=0, response_format={"type": "json_object"})
    text = plain.choices[0].message.content  # any object: ends valid, or is cut by max_tokens as a valid prefix
    assert text.startswith("{") and (plain.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}, "'pattern'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": [{"type": "string"}]}}}, "'anyOf'"),
    ({"type": "xml"}, "response_format must be"),
])
def test_unsupported_response_formats_are_refused_by_name(setup, fmt, words):
    with pytest.raises(openai.BadRequestError) as err:
        setup["client"].chat.completions.create(model="ad", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                                response_format=fmt)
    assert err.value.body["param"] == "response_format" and words in err.value.body["message"]


def test_top_logprobs_needs_logprobs(setup):
    with pytest.raises(openai.BadRequestError) as err:
        setup["client"].chat.completions.create(model="ad", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                                top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
