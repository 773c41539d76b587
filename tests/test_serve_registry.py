"""The adapter registry: on-demand loading from allowed directories only, a byte budget with LRU eviction,
pinning, adapters in use never evicted, and blends built once."""
from __future__ import annotations

import os

import pytest
import torch

import deltatune as dt
from deltatune.serve import Engine, RequestError
from deltatune.serve.registry import AdapterRegistry
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """adapters/{a,b,c,d}: rank-4 LoRA on q_proj, v_proj (4 sites x 2 layers... each 2*4*(64+64) floats)."""
    root = tmp_path_factory.mktemp("adapters")
    source = tiny_llama()
    for i, name in enumerate("abcd"):
        add_lora(source, name, 4, seed=10 + i)
        dt.save_adapter(source, root / name, name)
    return root


def _bytes_of_one(registry: AdapterRegistry) -> int:
    return next(iter(registry.entries.values())).nbytes


def test_loads_on_first_request_and_counts_hits(adapter_dir):
    model = tiny_llama()
    registry = AdapterRegistry(model, adapter_dirs=[adapter_dir])
    assert registry.available() == ["a", "b", "c", "d"]
    internal = registry.acquire("b")
    assert internal in dt.adapters(model) and registry.entries["b"].refs == 1
    assert registry.acquire("b") == internal and registry.entries["b"].refs == 2
    registry.release(internal), registry.release(internal)
    out = Engine(model, byte_tokenizer()).generate([[5, 6, 7]], [internal], max_new_tokens=6)[0]
    reference = tiny_llama()
    dt.load_adapter(reference, adapter_dir / "b", "b")
    assert out.token_ids == hf_greedy(reference, [5, 6, 7], "b", 6)


@pytest.mark.parametrize("name", ["../adapters", "a/../b", "/etc", ".", "..", "a b", "", "c/"])
def test_names_outside_the_allowed_dir_are_not_found(adapter_dir, name):
    registry = AdapterRegistry(tiny_llama(), adapter_dirs=[adapter_dir])
    with pytest.raises(RequestError) as err:
        registry.acquire(name)
    assert err.value.status == 404 and not registry.entries


def test_symlink_escape_pickle_only_and_admin_paths(adapter_dir, tmp_path):
    outside = tmp_path / "outside"
    (outside / "evil").mkdir(parents=True)
    for f in os.listdir(adapter_dir / "a"):
        (outside / "evil" / f).write_bytes((adapter_dir / "a" / f).read_bytes())
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(outside / "evil")
    (allowed / "pickled").mkdir()
    (allowed / "pickled" / "adapter_config.json").write_text((adapter_dir / "a" / "adapter_config.json").read_text())
    torch.save({}, allowed / "pickled" / "adapter_model.bin")
    registry = AdapterRegistry(tiny_llama(), adapter_dirs=[allowed])
    for name in ("link", "pickled"):
        with pytest.raises(RequestError, match="does not exist"):
            registry.acquire(name)
    with pytest.raises(PermissionError, match="not inside an allowed adapter directory"):
        registry.allowed_path(outside / "evil")
    with pytest.raises(PermissionError):
        registry.allowed_path("link")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        registry.allowed_path("pickled")


def test_budget_evicts_least_recently_used_but_never_pinned_or_in_use(adapter_dir):
    model = tiny_llama()
    probe = AdapterRegistry(model, adapter_dirs=[adapter_dir])
    probe.release(probe.acquire("a"))
    one = _bytes_of_one(probe)
    probe.unload("a")

    registry = AdapterRegistry(model, adapter_dirs=[adapter_dir], max_bytes=2 * one)
    registry.pin("a")  # loads a, pinned
    held = registry.acquire("b")  # in use
    with pytest.raises(RequestError) as err:  # a pinned, b in use: no room for c
        registry.acquire("c")
    assert err.value.status == 503 and set(registry.entries) == {"a", "b"}
    registry.release(held)
    registry.release(registry.acquire("c"))  # b is now the least recently used idle adapter: evicted
    assert set(registry.entries) == {"a", "c"} and registry.resident_bytes() <= 2 * one
    registry.pin("a", False)
    registry.release(registry.acquire("c"))  # c used again: a is now least recent
    registry.release(registry.acquire("d"))
    assert set(registry.entries) == {"c", "d"}
    assert set(dt.adapters(model)) == {e.internal for e in registry.entries.values()}


def test_unload_in_use_is_refused(adapter_dir):
    registry = AdapterRegistry(tiny_llama(), adapter_dirs=[adapter_dir])
    held = registry.acquire("a")
    with pytest.raises(RuntimeError, match="in use by 1 request"):
        registry.unload("a")
    registry.release(held)
    registry.unload("a")
    assert not registry.entries


def test_blend_is_built_once_and_counts_against_the_budget(adapter_dir):
    model = tiny_llama()
    registry = AdapterRegistry(model, adapter_dirs=[adapter_dir])
    first = registry.acquire({"a": 0.5, "b": 0.5})
    again = registry.acquire({"b": 0.5, "a": 0.5})
    assert first == again
    blend = next(e for e in registry.entries.values() if e.internal == first)
    assert blend.nbytes == registry.entries["a"].nbytes + registry.entries["b"].nbytes  # rank 4 + 4
    with pytest.raises(RequestError, match="must be a number"):
        registry.acquire({"a": "x"})
    with pytest.raises(RequestError, match="does not exist"):
        registry.acquire({"c": 0.5, "zz": 0.5})
    assert registry.entries["c"].refs == 0  # the part held while building is released when the blend fails


def test_named_adapter_outside_the_dirs_and_reload_after_eviction(adapter_dir):
    model = tiny_llama()
    registry = AdapterRegistry(model)  # no --adapter-dir: only named adapters
    registry.add("support-v2", adapter_dir / "c")
    assert registry.available() == ["support-v2"]
    registry.unload("support-v2")
    with pytest.raises(RequestError, match="does not exist"):
        registry.acquire("support-v2")  # unloading by the admin forgets it
    registry.add("support-v2", adapter_dir / "c")
    registry.max_bytes = registry.resident_bytes()
    registry.add("other", adapter_dir / "d")  # evicts support-v2 ...
    assert list(registry.entries) == ["other"]
    registry.release(registry.acquire("support-v2"))  # ... which reloads on demand from its path
    assert list(registry.entries) == ["support-v2"]
