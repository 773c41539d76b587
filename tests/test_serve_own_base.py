"""`deltatune serve` of a LoftQ / QPiSSA adapter, whose 4-bit base Q_T is rebuilt from the full-precision weights
for it alone: served on its own with the NF4 codes it was trained on and the rebuilt model's greedy tokens (fp32
and bf16); every other adapter refused with 409 before the base changes, also when the LoftQ adapter is the one
that would come second; the base model's name not served, since its weights are not in memory."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.cli import CommandError, build_parser, main
from deltatune.methods.lora_init import base_digest
from deltatune.quant.linear4bit import Linear4bit
from deltatune.serve import RequestError
from deltatune.serve.registry import AdapterRegistry
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, running_server, tiny_llama

LOFTQ = {"loftq_bits": 4, "loftq_iter": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """tiny/ (model + tokenizer), lq/ (a LoftQ adapter, factors moved off their start), plain/ (a LoRA)."""
    root = tmp_path_factory.mktemp("own-base")
    tiny_llama().save_pretrained(root / "tiny")
    byte_tokenizer().save_pretrained(root / "tiny")
    model = dt.attach(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights="loftq", loftq_config=LOFTQ), "lq")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, "lq").values():
            tensor.add_(torch.randn(tensor.shape, generator=g) * 0.05)
    digest = base_digest(model)
    dt.save_adapter(model, root / "lq", "lq")
    dt.save_adapter(add_lora(tiny_llama(), "p", 4, seed=3), root / "plain", "p")
    return root, digest


def _all_linear(model) -> bool:
    return not any(isinstance(m, Linear4bit) for m in model.modules())


def test_the_registry_builds_the_base_for_the_one_adapter_allowed_to(files):
    root, digest = files
    model = tiny_llama()
    registry = AdapterRegistry(model, own_base="lq")
    entry = registry.add("lq", root / "lq")
    assert registry.base_owner == "lq" and entry.pinned and base_digest(model) == digest  # the codes trained on
    reference = dt.load_adapter(tiny_llama(), root / "lq", "lq")
    prompt = byte_tokenizer()("hello there")["input_ids"]
    from deltatune.serve import Engine

    out = Engine(model, byte_tokenizer()).generate([prompt], [entry.internal], max_new_tokens=6)[0]
    assert out.token_ids == hf_greedy(reference, prompt, "lq", 6)
    for name, path in (("p", root / "plain"), ("lq", root / "lq")):  # another adapter, or lq replaced
        with pytest.raises(RequestError, match="own 4-bit base") as err:
            registry.add(name, path)
        assert err.value.status == 409 and list(registry.entries) == ["lq"] and base_digest(model) == digest


@pytest.mark.parametrize("first", [None, "p"])
def test_a_loftq_adapter_is_refused_where_it_would_change_a_shared_base(files, first):
    root, _ = files
    model = tiny_llama()
    registry = AdapterRegistry(model, own_base="lq" if first else None)
    if first:
        registry.add(first, root / "plain")
    with pytest.raises(RequestError, match="serve it on its own") as err:
        registry.add("lq", root / "lq")
    assert err.value.status == 409 and "srv_" not in str(err.value)  # the user's names, not internal ones
    assert _all_linear(model) and list(registry.entries) == ([first] if first else [])


def test_cli_serves_it_alone_and_not_the_base_name(files, monkeypatch):
    """serve_main up to uvicorn's run, in bf16: Q_T built from the fp32 weights (the codes trained on), the rest of
    the model in bf16 and the adapter in fp32; the openai client gets the adapter and a 404 for the base's name."""
    import openai
    import uvicorn

    import deltatune.serve.server as server_module

    root, digest = files
    servers = []
    monkeypatch.setattr(server_module.Server, "__init__", _recording(server_module.Server.__init__, servers))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: None)
    code = main(["serve", "--base", str(root / "tiny"), "--adapter", f"lq={root / 'lq'}", "--precision", "bf16",
                 "--threads", "1"])
    assert code in (0, None) and len(servers) == 1
    server = servers[0]
    model = server.engine.model
    assert base_digest(model) == digest and model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in dt.adapter_tensors(model, server.registry.entries["lq"].internal).values())
    monkeypatch.undo()
    with running_server(server) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["lq"]
        answer = client.completions.create(model="lq", prompt="hello", max_tokens=4, temperature=0)
        assert answer.choices[0].text is not None
        with pytest.raises(openai.NotFoundError, match="own 4-bit base"):
            client.completions.create(model="tiny", prompt="hello", max_tokens=4)


def _recording(init, into):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        into.append(self)
    return wrapped


@pytest.mark.parametrize("extra", [["--adapter", "p={plain}"], ["--adapter-dir", "{root}"], ["--quantize", "nf4"]])
def test_cli_refuses_anything_beside_it_before_loading(files, extra):
    from deltatune.serve.cli import own_base_adapter

    root, _ = files
    argv = ["serve", "--adapter", f"lq={root / 'lq'}"] + [x.format(plain=root / "plain", root=root) for x in extra]
    with pytest.raises(CommandError, match="served on its own"):
        own_base_adapter(build_parser().parse_args(argv))
