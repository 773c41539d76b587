"""DyLoRA: the forward at rank b against the formula and a LoRA of rank b, the frozen update bitwise, any rank
chosen when loading, the plain LoRA export read by peft; and the seams it brought (load overrides, filling an
adapter from tensors)."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, assert_unchanged, capture_state, make_tiny_llama, no_grad_logits
from deltatune.core.io import split_adapter_spec
from deltatune.methods.dylora import RankSampler
from test_cli import model_dir  # noqa: F401  (a saved tiny model with a tokenizer, for the CLI)

TARGETS = ["q_proj", "v_proj"]
PREFIX = "base_model.model."


def _dylora(r: int = 6, alpha: float = 12, seed: int = 3, **kwargs):
    model = make_tiny_llama()
    dt.attach(model, dt.DyLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, **kwargs), "default")
    generator = torch.Generator().manual_seed(seed)
    filled = {k: torch.randn(t.shape, generator=generator) * 0.2 for k, t in dt.adapter_tensors(model, "default").items()}
    dt.set_adapter_tensors(model, "default", filled)
    return model, filled


def _lora_at(filled: dict, b: int, alpha: float):
    """A plain LoRA of rank b, lora_alpha α, holding DyLoRA's first b components: what DyLoRA at b must equal."""
    model = make_tiny_llama()
    dt.attach(model, dt.LoraConfig(r=b, lora_alpha=alpha, target_modules=TARGETS), "default")
    cut = {k: (v[:b] if "lora_A" in k else v[:, :b]) for k, v in filled.items()}
    dt.set_adapter_tensors(model, "default", cut)
    return model


def test_forward_at_rank_b_equals_formula_and_lora_of_rank_b(input_ids, tmp_path):
    model, filled = _dylora()
    dt.save_adapter(model, tmp_path)
    for b in (1, 3, 6):
        at_b = dt.load_adapter(make_tiny_llama(), tmp_path, overrides={"rank": b})
        torch.testing.assert_close(no_grad_logits(at_b, input_ids), no_grad_logits(_lora_at(filled, b, 12), input_ids),
                                   atol=1e-6, rtol=1e-6)
    # the formula at one layer: W0·x + (α/b)·B[:, :b]·A[:b]·x
    site = model.get_submodule("model.layers.0.self_attn.q_proj")
    delta = site.deltas["default"]
    x = torch.randn(2, 64)
    A, B = delta.lora_A.weight, delta.lora_B.weight
    with torch.no_grad():
        delta.sampled = 2
        site.train()
        torch.testing.assert_close(site(x), site.base_layer(x) + (12 / 2) * x @ A[:2].T @ B[:, :2].T)
        site.eval()  # outside training: rank (None: r)
        torch.testing.assert_close(site(x), site.base_layer(x) + (12 / 6) * x @ A.T @ B.T)


def test_rank_above_the_trained_maximum_is_refused_before_anything_changes(tmp_path):
    model, _ = _dylora(r=4)
    dt.save_adapter(model, tmp_path)
    target = make_tiny_llama()
    saved = capture_state(target)
    with pytest.raises(dt.AdapterFileError, match=r"rank=5 is above the trained maximum r=4"):
        dt.load_adapter(target, tmp_path, overrides={"rank": 5})
    with pytest.raises(dt.AdapterFileError, match=r"'rnak' is not a field of DyLoraConfig"):
        dt.load_adapter(target, f"{tmp_path}@rnak=2")
    assert_unchanged(target, saved)
    with pytest.raises(dt.ConfigError, match="rank=9 is above"):
        dt.DyLoraConfig(r=8, rank=9)


def test_adapter_spec_syntax(tmp_path, input_ids):
    assert split_adapter_spec("runs/x@rank=4,frozen=false,name=abc") == ("runs/x", {"rank": 4, "frozen": False, "name": "abc"})
    assert split_adapter_spec(str(tmp_path)) == (str(tmp_path), {})
    odd = tmp_path / "a@b"
    model, _ = _dylora()
    dt.save_adapter(model, odd)  # a directory whose name holds '@' loads as it is
    assert split_adapter_spec(str(odd)) == (str(odd), {})
    loaded = dt.load_adapter(make_tiny_llama(), f"{odd}@rank=2")
    assert dt.adapter_configs(loaded)["default"].rank == 2
    with pytest.raises(dt.AdapterFileError, match="KEY=VALUE"):
        split_adapter_spec("runs/x@rank")


def test_export_at_rank_b_is_a_plain_lora_file_peft_reads(input_ids, tmp_path):
    peft = pytest.importorskip("peft")
    model, filled = _dylora()
    dt.save_adapter(model, tmp_path / "dy")
    at_3 = dt.load_adapter(make_tiny_llama(), f"{tmp_path / 'dy'}@rank=3")
    dt.save_as_lora(at_3, tmp_path / "lora")
    assert dt.adapter_configs(at_3).keys() == {"default"}  # the helper adapter is gone
    config, tensors, _ = dt.read_adapter(tmp_path / "lora")
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 3, 12)
    assert config.target_modules == ("q_proj", "v_proj")  # the short names, as vLLM's configs have them
    assert {tuple(t.shape) for k, t in tensors.items() if "lora_A" in k} == {(3, 64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(no_grad_logits(theirs, input_ids), no_grad_logits(at_3, input_ids), atol=1e-5, rtol=1e-5)


def _train_steps(model, frozen_check, steps: int = 4, **optim):
    hook = RankSampler(model, dt.adapter_configs(model)["default"], "default")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, **optim)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    seen = set()
    for step in range(1, steps + 1):
        before = {k: v.detach().clone() for k, v in dt.adapter_tensors(model, "default").items()}
        loss = model(ids, labels=ids).loss
        loss.backward()
        hook.before_step(model, optimizer, step)
        optimizer.step()
        b = hook.rank
        hook.on_step(model, optimizer, step)
        optimizer.zero_grad()
        seen.add(b)
        for key, value in dt.adapter_tensors(model, "default").items():
            frozen_check(key, before[key], value.detach(), b)
    return seen


def test_frozen_mode_changes_only_component_b_bitwise_under_adamw_with_state():
    torch.manual_seed(0)
    model, _ = _dylora(r=4)

    def check(key, before, after, b):
        comp = lambda t, i: t[i] if "lora_A" in key else t[:, i]  # noqa: E731
        for i in range(4):
            if i == b - 1:
                assert not torch.equal(comp(before, i), comp(after, i)), (key, i, b)
            else:
                assert torch.equal(comp(before, i), comp(after, i)), (key, i, b)

    assert len(_train_steps(model, check, steps=8)) > 1  # several ranks drawn, the state non-zero after step 1


def test_unfrozen_mode_changes_the_first_b_components_only():
    model, _ = _dylora(r=4, frozen=False)

    def check(key, before, after, b):
        comp = lambda t, i: t[i] if "lora_A" in key else t[:, i]  # noqa: E731
        for i in range(4):
            assert torch.equal(comp(before, i), comp(after, i)) == (i >= b), (key, i, b)

    _train_steps(model, check, steps=6)


def test_sampler_state_resumes_the_same_ranks():
    model, _ = _dylora(r=8)
    torch.manual_seed(5)
    first = RankSampler(model, dt.adapter_configs(model)["default"], "default")
    ranks = [first.rank]
    state = None
    for step in range(6):
        if step == 3:
            state = first.state_dict()
        first.rank = first._sample()
        ranks.append(first.rank)
    resumed = RankSampler(model, dt.adapter_configs(model)["default"], "default")
    resumed.load_state_dict(state)
    assert all(d.sampled == ranks[3] for _, d in dt.adapters(model)["default"].deltas(model))
    again = [resumed.rank]
    for _ in range(3):
        resumed.rank = resumed._sample()
        again.append(resumed.rank)
    assert again == ranks[3:]


def test_merged_equals_unmerged_and_mixed_batch_with_lora_rows(input_ids, tmp_path):
    model, _ = _dylora()
    dt.save_adapter(model, tmp_path)
    model = make_tiny_llama()
    dt.load_adapter(model, tmp_path, "dy", overrides={"rank": 2})
    torch.manual_seed(4)
    dt.attach(model, dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), "lora")
    ids = torch.cat([input_ids, input_ids[:1]])
    assert_mixed_equals_alone(model, ids, ["dy", "lora", None, "dy"])
    dt.set_active(model, "dy")
    unmerged = no_grad_logits(model, input_ids)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), unmerged, atol=1e-5, rtol=1e-5)


def test_set_adapter_tensors_checks_everything_before_writing():
    model, filled = _dylora()
    saved = capture_state(model)
    key = next(iter(filled))
    bare = key[len(PREFIX):]
    with pytest.raises(ValueError, match="has no tensor"):
        dt.set_adapter_tensors(model, "default", {**filled, "nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"has shape \(1,\) but adapter 'default' needs"):
        dt.set_adapter_tensors(model, "default", {**filled, key: torch.zeros(1)})
    with pytest.raises(ValueError, match="leave out"):
        dt.set_adapter_tensors(model, "default", {bare: torch.zeros_like(filled[key])})
    assert_unchanged(model, saved)
    dt.set_adapter_tensors(model, "default", {bare: torch.zeros_like(filled[key])}, strict=False)  # prefix optional
    assert torch.equal(dt.adapter_tensors(model, "default")[key], torch.zeros_like(filled[key]))


def test_train_samples_ranks_and_resumes_exactly(tmp_path):
    """Through `train()`: the hook's sampled ranks and generator are checkpointed, so a killed run resumed from
    its checkpoint equals the run never stopped (losses and tensors, bitwise)."""
    from test_train_loop import KillAt, Killed, prompt_completion, run, saved, make_tokenizer

    tokenizer = make_tokenizer()
    common = dict(max_steps=6, batch_size=2, save_every=3, optim={"lr": 5e-3, "weight_decay": 0.1},
                  adapter={"peft_type": "DYLORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    records = prompt_completion(6)
    full = run(tmp_path, "full", records, tokenizer, **common)
    with pytest.raises(Killed):
        run(tmp_path, "cut", records, tokenizer, hooks=[KillAt(5)], **common)
    resumed = run(tmp_path, "cut", records, tokenizer, resume=True, **common)
    assert resumed.losses == {s: full.losses[s] for s in (4, 5, 6)}
    a, b = saved(resumed.adapter_dir), saved(full.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_serve_registry_and_cli_take_the_rank_after_the_path(tmp_path, capsys):
    from serve_helpers import tiny_llama
    from deltatune.serve import RequestError
    from deltatune.serve.registry import AdapterRegistry

    source = tiny_llama()
    dt.attach(source, dt.DyLoraConfig(r=4, target_modules=TARGETS))
    dt.save_adapter(source, tmp_path / "dy")
    registry = AdapterRegistry(tiny_llama())
    entry = registry.add("dy2", f"{tmp_path / 'dy'}@rank=2")
    assert dt.adapter_configs(registry.model)[entry.internal].rank == 2
    with pytest.raises(RequestError, match="rank=7 is above the trained maximum r=4"):
        registry.add("dy7", f"{tmp_path / 'dy'}@rank=7")
    from deltatune.commands import recorded_base_quantization
    assert recorded_base_quantization(f"{tmp_path / 'dy'}@rank=2") == ""  # reads the directory before '@'


def test_cli_to_lora_at_rank_b(tmp_path, model_dir, capsys):
    from deltatune.cli import main

    base = model_dir
    model, filled = _dylora(r=4, alpha=8)
    dt.save_adapter(model, tmp_path / "dy")
    code = main(["to-lora", "--base", str(base), "--adapter", f"{tmp_path / 'dy'}@rank=2", "--out", str(tmp_path / "lora"),
                 "--quantize", "none"])
    assert code in (0, None)
    assert "exact" in capsys.readouterr().out
    config, tensors, _ = dt.read_adapter(tmp_path / "lora")
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 2, 8)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(tensors[key], filled[key][:2])


DDP_ADAPTER = {"peft_type": "DYLORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "init_lora_weights": "gaussian"}
DDP_COMMON = dict(max_steps=3, precision="fp32", optim={"lr": 1e-2, "weight_decay": 0.1}, adapter=DDP_ADAPTER)


def _ddp_rank(rank: int, port: int, data: str, out: str, errors) -> None:
    import os
    import traceback

    from deltatune.train.loop import train
    from test_train_loop import make_tokenizer

    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                          LOCAL_RANK=str(rank))
        train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=out, data={"train": data}, batch_size=2,
              **DDP_COMMON)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def test_two_processes_sample_the_same_ranks_and_equal_one_process(tmp_path):
    """Each process samples b from its own generator (the run's seed): they agree (checked every step by one
    all_reduce), so 2 processes x batch 2 train what 1 process x batch 4 trains."""
    import sys

    import torch.multiprocessing as mp

    from deltatune.train.loop import train
    from test_ddp import _free_port
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    data = str(write_jsonl(tmp_path / "train.jsonl", prompt_completion(8)))
    single = train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / "single"),
                   data={"train": data}, batch_size=4, **DDP_COMMON)
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    errors, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, data, str(tmp_path / "ddp"), errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures and all(p.exitcode == 0 for p in procs), "\n".join(failures)
    a, b = dt.read_adapter(tmp_path / "ddp" / "adapter")[1], dt.read_adapter(single.adapter_dir)[1]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
