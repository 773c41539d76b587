"""`attention: per_example` (deltatune.train.attention): on packed rows on a CPU, each packed example's own
causal block instead of SDPA over the masked row. Close to SDPA under bf16 (rounding of another order), equal
to float rounding in fp32, SDPA itself everywhere else (unpacked rows with padding, decode steps), a config key."""
from __future__ import annotations

import pytest
import torch

from deltatune.core.config import ConfigError
from deltatune.data import collate
from deltatune.train import attention
from deltatune.train.config import TrainConfig, load_config

from conftest import make_tiny_llama
from test_train_loop import prompt_completion, run


@pytest.fixture(scope="module")
def tokenizer():
    from test_train_loop import make_tokenizer

    return make_tokenizer()


def _packed_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    rows = [[5, 9, 3], [12, 4], [17]]  # examples per row; the shorter rows end in padding (a segment of its own)
    examples = []
    for lengths in rows:
        ids = torch.randint(3, 250, (sum(lengths),), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids, "position_ids": [p for n in lengths for p in range(n)]})
    return collate(examples, pad_id=0)


def _forward(model, batch, implementation: str, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.set_attn_implementation(implementation)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        logits = model(**kwargs, use_cache=False).logits.float()
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def _spy(monkeypatch) -> dict:
    calls = {"per_example": 0, "sdpa": 0}
    original = attention._Plan.get

    def get(self, position_ids, mask, batch):
        starts = original(self, position_ids, mask, batch)
        calls["sdpa" if starts is None else "per_example"] += 1
        return starts
    monkeypatch.setattr(attention._Plan, "get", get)
    return calls


def _assert_close(got: tuple, want: tuple, *, logits: float, rtol: float, atol: float) -> None:
    """(logits, gradients) of two `_forward`s: the logits to `logits`, the gradients to rtol/atol."""
    torch.testing.assert_close(got[0], want[0], rtol=logits, atol=logits)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _both(monkeypatch, model, batch, bf16: bool) -> tuple[tuple, tuple, dict]:
    """(per_example's (logits, gradients), SDPA's, the counts of the path per_example took)."""
    ref = _forward(model, batch, "sdpa", bf16=bf16)
    calls = _spy(monkeypatch)
    return _forward(model, batch, attention.register(), bf16=bf16), ref, calls


def test_per_example_is_sdpa_to_bf16_rounding_forward_and_backward(monkeypatch):
    model, batch = make_tiny_llama(), _packed_batch()
    got, ref, calls = _both(monkeypatch, model, batch, bf16=True)
    assert calls["per_example"] > 0 and calls["sdpa"] == 0
    exact_logits, _ = _forward(model, batch, "sdpa", bf16=False)
    # as far from the fp32 result as SDPA's bf16 run is, not further (another rounding order, not another function)
    assert (got[0] - exact_logits).abs().mean() <= 1.5 * (ref[0] - exact_logits).abs().mean() + 1e-4
    _assert_close(got, ref, logits=0.05, rtol=0.1, atol=0.02)


def test_it_never_attends_across_examples():
    """An example's outputs do not change when another example of its row changes."""
    model, batch = make_tiny_llama(), _packed_batch()
    model.set_attn_implementation(attention.register())
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, 5:14] = 7  # row 0's second example
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        b = model(input_ids=other["input_ids"], position_ids=other["position_ids"], use_cache=False).logits
    assert torch.equal(a[0, :5], b[0, :5]) and torch.equal(a[0, 14:17], b[0, 14:17]) and torch.equal(a[1:], b[1:])
    assert not torch.equal(a[0, 5:14], b[0, 5:14])


def test_in_fp32_it_is_sdpa_per_example_exactly(monkeypatch):
    got, ref, calls = _both(monkeypatch, make_tiny_llama(), _packed_batch(), bf16=False)
    assert calls["per_example"] > 0
    _assert_close(got, ref, logits=1e-5, rtol=1e-4, atol=1e-6)


def test_everything_else_is_sdpa_bit_for_bit(monkeypatch):
    """Unpacked rows with a padding mask; a generate() decode with a cache: SDPA, the same bits."""
    model = make_tiny_llama()
    name = attention.register()
    calls = _spy(monkeypatch)
    unpacked = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]},
                        {"input_ids": [10, 11], "labels": [10, 11]}], pad_id=0)
    for bf16 in (True, False):
        ref, _ = _forward(model, unpacked, "sdpa", bf16=bf16)
        got, _ = _forward(model, unpacked, name, bf16=bf16)
        assert torch.equal(got, ref)
    assert calls["per_example"] == 0
    model.set_attn_implementation("sdpa")
    prompt = torch.tensor([[5, 6, 7, 8]])
    want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    model.set_attn_implementation(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # runs: one row, no packing mask
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), want)  # decode steps: SDPA


def test_unpacked_rows_without_padding_are_each_one_example(monkeypatch):
    """No packing and no padding: transformers passes no mask and one row of position_ids for the batch; every
    row is one causal example (a bug once left the rows after the first uncomputed)."""
    model = make_tiny_llama()
    ids = torch.randint(3, 250, (3, 11), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    got, ref, calls = _both(monkeypatch, model, batch, bf16=True)
    assert calls["per_example"] > 0
    _assert_close(got, ref, logits=0.05, rtol=0.1, atol=0.02)


def test_a_mask_that_is_not_the_packing_mask_goes_to_sdpa():
    starts = [[0, 3, 5], [0, 5]]
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    mask[0, 0, :3, :3], mask[0, 0, 3:, 3:], mask[1, 0] = causal[:3, :3], causal[:2, :2], causal
    assert attention._is_packing_mask(mask, starts)
    mask[1, 0, 4, 0] = False  # a padding-like hole
    assert not attention._is_packing_mask(mask, starts)
    assert not attention._is_packing_mask(mask.float(), starts)


def test_bf16_rounds_only_the_output_closer_to_exact_than_sdpa():
    """On the same bf16 inputs, its outputs are exact attention rounded once to bf16; SDPA's bf16 kernel also
    rounds the probabilities, so it is further from exact, and its gradients too."""
    g = torch.Generator().manual_seed(0)
    lengths = [[7, 20, 5], [32]]
    q, k, v = (torch.randn(2, h, 32, 16, generator=g).bfloat16().requires_grad_() for h in (6, 2, 2))
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    starts = attention._starts(position_ids)
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    for b, row in enumerate(starts):
        for s, e in zip(row, row[1:]):
            mask[b, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    grad_out = torch.randn(2, 32, 6, 16, generator=g, dtype=torch.float64)

    def run_(fn, *inputs):
        out = fn(*inputs)
        (out.double() * grad_out).sum().backward()
        return out.detach().double(), [x.grad.double() for x in inputs]

    exact = run_(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2), *(x.detach().double().requires_grad_() for x in (q, k, v)))
    ours = run_(lambda q, k, v: attention._per_example(q, k, v, starts, None, bf16=True), q, k, v)
    for x in (q, k, v):
        x.grad = None
    sdpa = run_(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2), q, k, v)
    # one rounding, at the output: exact attention rounded to bf16 but where fp32 lands beside a tie
    assert (ours[0] != exact[0].bfloat16().double()).float().mean() < 0.01
    assert (ours[0] - exact[0]).abs().mean() < (sdpa[0] - exact[0]).abs().mean()
    for got, ref, want in zip(ours[1], sdpa[1], exact[1]):
        assert (got - want).abs().mean() < (ref - want).abs().mean()


def test_auto_takes_it_on_packed_rows_of_a_transformers_model_on_sdpa(monkeypatch):
    from deltatune.train.config import DataConfig
    from deltatune.train.model_setup import _attention_per_example

    model = make_tiny_llama()
    assert TrainConfig().attention == "auto"
    packed = DataConfig(packing=True)
    assert _attention_per_example(model, TrainConfig(data=packed))
    assert not _attention_per_example(model, TrainConfig())  # unpacked rows: SDPA as loaded
    assert not _attention_per_example(model, TrainConfig(data=packed, attention="sdpa"))
    assert _attention_per_example(model, TrainConfig(attention="per_example"))
    model.set_attn_implementation("eager")  # the user's choice is kept
    assert not _attention_per_example(model, TrainConfig(data=packed))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not _attention_per_example(plain, TrainConfig(data=packed))
    with pytest.raises(ConfigError, match="transformers model"):
        _attention_per_example(plain, TrainConfig(attention="per_example"))


def test_the_config_key(tmp_path, tokenizer, monkeypatch):
    calls = _spy(monkeypatch)
    assert load_config(overrides=["--attention", "per_example"]).attention == "per_example"
    with pytest.raises(ConfigError, match="attention"):
        TrainConfig(attention="flash")
    result = run(tmp_path, "per_example", prompt_completion(8), tokenizer, precision="bf16", max_steps=2,
                 batch_size=2, attention="per_example", data={"packing": True})
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert calls["per_example"] > 0


def test_checkpointing_recomputes_it_exactly(tmp_path, tokenizer):
    """Memory mode's backward recomputes the same per-example attention: the same losses and adapter."""
    from test_train_loop import assert_same_tensors, saved

    common = dict(precision="bf16", max_steps=2, batch_size=2, attention="per_example", data={"packing": True},
                  optim={"lr": 5e-3})
    plain = run(tmp_path, "plain", prompt_completion(8), tokenizer, **common)
    for policy in (True, "selective"):
        other = run(tmp_path, str(policy), prompt_completion(8), tokenizer, gradient_checkpointing=policy, **common)
        assert other.losses == plain.losses, policy
        assert_same_tensors(saved(other.adapter_dir), saved(plain.adapter_dir), rtol=0, atol=0)
