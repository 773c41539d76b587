"""The server's blends and named combinations through deltatune.compose: per-request blends computed by compose's
cat with the tensors (so the logits) of the earlier implementation; named combinations listed, budgeted, reloaded."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.compose import combine_adapters
from deltatune.core.adapter import resolve
from deltatune.serve import RequestError
from deltatune.serve.registry import AdapterRegistry, blend_lora
from serve_helpers import add_lora, tiny_llama


def _old_blend(model, weights):
    """The server's blend before it called compose (commit 360dc37), kept as the reference: {site: (A, B)}."""
    attached = dt.adapters(model)
    sites: dict = {}
    for n in weights:
        for path, delta in attached[n].deltas(model):
            sites.setdefault(path, {})[n] = delta
    ranks = {n: max(d.lora_A.weight.shape[0] for s in sites.values() for a, d in s.items() if a == n) for n in weights}
    out = {}
    for path, parts in sites.items():
        any_delta = next(iter(parts.values()))
        A = torch.zeros(sum(ranks.values()), any_delta.lora_A.weight.shape[1])
        B = torch.zeros(any_delta.lora_B.weight.shape[0], sum(ranks.values()))
        start = 0
        for n, w in weights.items():
            if n in parts:
                r = parts[n].lora_A.weight.shape[0]
                A[start: start + r] = parts[n].lora_A.weight
                B[:, start: start + r] = parts[n].lora_B.weight * (w * parts[n].scaling)
            start += ranks[n]
        out[path] = (A, B)
    return out


def test_blends_keep_the_earlier_tensors_and_logits_bit_for_bit():
    model = tiny_llama()
    add_lora(model, "r2", 2, seed=1)
    add_lora(model, "r4", 4, seed=2)
    weights = {"r2": 0.7, "r4": -0.45}
    reference = _old_blend(model, weights)
    name = blend_lora(model, weights, "blend_x")
    for path, delta in dt.adapters(model)[name].deltas(model):
        A, B = reference[path]
        assert torch.equal(delta.lora_A.weight, A) and torch.equal(delta.lora_B.weight, B), path
    ids = torch.tensor([[5, 6, 7, 8]])
    dt.set_active(model, name)
    with torch.no_grad():
        blended = model(ids).logits
    for path, (A, B) in reference.items():  # the old tensors written into the same adapter give the same logits
        site = model.get_submodule(resolve(model, path)).deltas[name]
        with torch.no_grad():
            site.lora_A.weight.copy_(A), site.lora_B.weight.copy_(B)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, blended)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    source = tiny_llama()
    for i, name in enumerate("abc"):
        add_lora(source, name, 4, seed=20 + i)
        dt.save_adapter(source, root / name, name)
    return root


def test_named_combinations_are_listed_budgeted_and_reloaded(adapter_dir, tmp_path):
    model = tiny_llama()
    registry = AdapterRegistry(model, adapter_dirs=[adapter_dir])
    entry = registry.add_combination("ab_svd", {"a": 0.6, "b": 0.4}, combination_type="svd", svd_rank=4,
                                     directory=tmp_path)
    assert "ab_svd" in registry.available() and entry.nbytes == registry.entries["a"].nbytes  # rank 4 like a
    assert registry.resident_bytes() == sum(e.nbytes for e in registry.entries.values())
    reference = tiny_llama()
    for n in "ab":
        dt.load_adapter(reference, adapter_dir / n, n)
    combine_adapters(reference, ["a", "b"], [0.6, 0.4], "ref", combination_type="svd", svd_rank=4)
    ours, theirs = dt.adapter_tensors(model, entry.internal), dt.adapter_tensors(reference, "ref")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    registry.unload("a"), registry.unload("b")
    registry._drop(registry.entries["ab_svd"], evicted=True)  # as an eviction would
    assert "ab_svd" in registry.available()
    registry.release(registry.acquire("ab_svd"))  # reloaded from its saved file
    registry.release(registry.acquire({"a": 0.5, "c": 0.5}))  # a per-request blend beside it (unlisted: test_serve_guards)
    with pytest.raises(RequestError, match="negative"):
        registry.add_combination("bad", {"a": -1.0, "b": 1.0}, combination_type="linear")
    assert "bad" not in registry.available()
