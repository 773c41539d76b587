"""Training building blocks: chunked loss (parity with the full-logits cross-entropy), optimizer, schedule, progress."""
from __future__ import annotations

import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.train.config import OptimConfig
from deltatune.train.loss import auto_chunk_size, causal_lm_loss
from deltatune.train.memory import (CHEAP_REDUCTION, copy_out_of_file_mappings, selective_checkpointing_context,
                                    store_frozen_linears_in_bf16)
from deltatune.train.optim import build_optimizer, build_scheduler, lr_multiplier
from deltatune.train.progress import Progress, plot_metrics

from conftest import make_tiny_llama


# ---- loss ------------------------------------------------------------------------------------------------
def _lora_llama(target_modules="all-linear", seed: int = 0):
    model = make_tiny_llama(seed)
    return dt.attach(model, dt.LoraConfig(r=4, target_modules=target_modules, init_lora_weights=False))


def _batch(pad: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt not learned
    mask = torch.ones_like(ids)
    if pad:
        mask[2, 9:] = 0  # right padding
        labels[2, 9:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(model, batch) -> tuple[torch.Tensor, int]:
    """transformers' way: every logit, upcast to fp32, shifted, summed over labels != -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:].flatten()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_parity(model, batch, chunk_size: int, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    ref_loss, ref_n = _reference(model, batch)
    ref_grads = _grads(model, ref_loss)
    loss, n = causal_lm_loss(model, batch, chunk_size)
    grads = _grads(model, loss)
    assert n == ref_n
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol * 10, atol=atol * 10, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_loss_matches_full_logits(chunk_size):
    _assert_parity(_lora_llama(), _batch(), chunk_size)


def test_chunked_loss_trainable_head_with_bias():
    model = make_tiny_llama()
    model.config.tie_word_embeddings = False
    torch.manual_seed(5)
    model.lm_head = nn.Linear(64, 256, bias=True)  # untied, biased, trained in full
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    _assert_parity(model, _batch(), chunk_size=7)


def test_chunked_loss_head_wrapped_by_lora_uses_checkpointing():
    model = _lora_llama(target_modules=["q_proj", "lm_head"])
    assert type(model.lm_head) is not nn.Linear
    _assert_parity(model, _batch(), chunk_size=7)


def test_chunked_loss_without_separable_head_falls_back_to_logits():
    inner = _lora_llama()

    class Wrapped(nn.Module):  # no get_output_embeddings/get_decoder: only .logits is reachable
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return SimpleNamespace(logits=self.inner(**kwargs).logits)

    model = Wrapped()
    batch = _batch()
    ref_loss, ref_n = _reference(inner, batch)
    loss, n = causal_lm_loss(model, batch, chunk_size=7)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss)


def test_chunked_loss_under_bf16_autocast_is_close():
    model, batch = _lora_llama(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _ = _reference(model, batch)
        loss, _ = causal_lm_loss(model, batch, chunk_size=7)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0.0)
    ref_grads, grads = _grads(model, ref_loss), _grads(model, loss)
    for name, grad in grads.items():
        cos = F.cosine_similarity(grad.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_chunked_loss_no_counted_token_gives_zero_without_nan():
    model, batch = _lora_llama(), _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, n = causal_lm_loss(model, batch, chunk_size=7)
    assert n == 0 and loss.item() == 0.0
    grads = _grads(model, loss)
    assert all(torch.isfinite(g).all() and not g.any() for g in grads.values())


def test_chunked_loss_without_grad_for_evaluation():
    model, batch = _lora_llama(), _batch()
    with torch.no_grad():
        loss, n = causal_lm_loss(model, batch, chunk_size=7)
        ref_loss, _ = _reference(model, batch)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss)


def test_chunked_loss_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        causal_lm_loss(_lora_llama(), _batch(), chunk_size=-1)


def test_chunk_size_zero_is_chosen_from_the_vocabulary():
    assert auto_chunk_size(49152, torch.device("cpu")) == 128  # 24 MiB of fp32 logits per chunk
    assert auto_chunk_size(10**7, torch.device("cpu")) == 16 and auto_chunk_size(49152, torch.device("cuda")) == 1024
    _assert_parity(_lora_llama(), _batch(), chunk_size=0)


# ---- the frozen base in bf16 -----------------------------------------------------------------------------
def test_frozen_linears_in_bf16_compute_what_autocast_computed():
    model = _lora_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # a tied head must keep its dtype
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _ = causal_lm_loss(model, batch, chunk_size=7)
    ref_grads = _grads(model, ref_loss)
    changed = store_frozen_linears_in_bf16(model)
    copy_out_of_file_mappings(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert changed == 2 * 7 and layer.base_layer.weight.dtype == torch.bfloat16
    lora_a = next(param for name, param in layer.named_parameters() if "lora_A" in name)
    assert lora_a.dtype == torch.float32  # trainable: untouched
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, batch, chunk_size=7)
    grads = _grads(model, loss)
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name



def test_a_memory_mapped_base_keeps_its_values_when_its_file_pages_are_released(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.train.memory import _FilePages

    make_tiny_llama(seed=1).save_pretrained(tmp_path, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # tensors in the file's mapping
    expected = {name: t.detach().clone() for name, t in model.state_dict().items()}
    assert _FilePages().ranges  # the file is mapped (Linux); elsewhere the release is skipped and this is moot
    heap = torch.arange(4096, dtype=torch.float32)
    _FilePages().release(heap)  # not in a file mapping: left alone
    assert torch.equal(heap, torch.arange(4096, dtype=torch.float32))
    model = dt.attach(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    store_frozen_linears_in_bf16(model)
    copy_out_of_file_mappings(model)
    state = {name.replace("base_layer.", ""): t for name, t in model.state_dict().items() if "lora_" not in name}
    assert state.keys() >= expected.keys()
    for name, value in expected.items():  # bf16 where a frozen linear, else bit for bit
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, _batch(), chunk_size=7)
    assert torch.isfinite(loss)

# ---- selective checkpointing -----------------------------------------------------------------------------
# the tiny Llama: hidden 64, MLP 128, LoRA r=4; (8, inf) keeps every matmul output but LoRA's B(A x), (8, 64) not
# the MLP's gate/up either, (inf, inf) attention's outputs only; the default keeps down_proj's (reduction 128)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("keep", [(CHEAP_REDUCTION, math.inf), (8, math.inf), (8, 64), (math.inf, math.inf)])
def test_selective_checkpointing_gives_the_gradients_of_no_checkpointing(precision, keep):
    batch = _batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    results = []
    for context_fn in (None, selective_checkpointing_context(*keep)):
        model = _lora_llama().train()
        if context_fn is not None:
            kwargs = {"use_reentrant": False, "context_fn": context_fn}
            if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        with autocast:
            loss, _ = causal_lm_loss(model, batch, chunk_size=7)
        results.append((loss, _grads(model, loss)))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


def test_selective_checkpointing_keeps_wide_matmuls_and_recomputes_the_rank_r_product():
    from torch.utils.checkpoint import CheckpointPolicy

    from deltatune.train.memory import _keep_expensive, _keep_outputs

    wide, rank_r = torch.empty(8, CHEAP_REDUCTION + 1), torch.empty(8, CHEAP_REDUCTION)
    mm, addmm = torch.ops.aten.mm.default, torch.ops.aten.addmm.default
    assert _keep_expensive(None, mm, wide, torch.empty(CHEAP_REDUCTION + 1, 4)) == CheckpointPolicy.MUST_SAVE
    assert _keep_expensive(None, addmm, torch.empty(4), wide, torch.empty(CHEAP_REDUCTION + 1, 4)) == CheckpointPolicy.MUST_SAVE
    assert _keep_expensive(None, mm, rank_r, torch.empty(CHEAP_REDUCTION, 4)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _keep_expensive(None, torch.ops.aten.mul.Tensor, wide, wide) == CheckpointPolicy.PREFER_RECOMPUTE
    narrow = functools.partial(_keep_outputs, CHEAP_REDUCTION, 4)  # outputs wider than 4 recomputed
    assert narrow(None, mm, wide, torch.empty(CHEAP_REDUCTION + 1, 4)) == CheckpointPolicy.MUST_SAVE
    assert narrow(None, mm, wide, torch.empty(CHEAP_REDUCTION + 1, 5)) == CheckpointPolicy.PREFER_RECOMPUTE
    attention_only = functools.partial(_keep_outputs, math.inf, math.inf)
    assert attention_only(None, mm, wide, torch.empty(CHEAP_REDUCTION + 1, 4)) == CheckpointPolicy.PREFER_RECOMPUTE


def test_release_freed_heap_keeps_live_tensors():
    from deltatune.train.memory import release_freed_heap

    kept, freed = torch.arange(1 << 20, dtype=torch.float32), torch.ones(1 << 20)
    del freed
    assert isinstance(release_freed_heap(), bool)
    assert torch.equal(kept, torch.arange(1 << 20, dtype=torch.float32))


# ---- optimizer and schedule ------------------------------------------------------------------------------
def _groups_by_name(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_optimizer_loraplus_groups_and_lrs():
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    model.model.norm.weight.requires_grad_(True)  # a 1-D parameter: no weight decay
    cfg = OptimConfig(lr=1e-4, weight_decay=0.1, loraplus_lr_ratio=16)
    groups = _groups_by_name(build_optimizer(model, cfg))
    assert set(groups) == {"default", "lora_B", "lora_embedding", "default_no_decay"}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-4) and groups["lora_B"]["initial_lr"] == pytest.approx(16e-4)
    assert groups["default"]["lr"] == 1e-4 and groups["lora_embedding"]["lr"] == 1e-6
    assert all("lora_B." in n for n in groups["lora_B"]["param_names"])
    assert all("lora_A." in n for n in groups["default"]["param_names"])
    assert sorted(n.split(".")[-1] for n in groups["lora_embedding"]["param_names"]) == ["lora_embedding_A", "lora_embedding_B"]
    assert groups["default_no_decay"]["param_names"] == ["model.norm.weight"]
    assert groups["default_no_decay"]["weight_decay"] == 0.0 and groups["lora_B"]["weight_decay"] == 0.1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for g in groups.values() for n in g["param_names"]}


def test_optimizer_without_loraplus_uses_one_lr_and_fused_adamw():
    model = _lora_llama()
    optimizer = build_optimizer(model, OptimConfig(lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01))
    assert [g["name"] for g in optimizer.param_groups] == ["default"]
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.01)
    assert group["fused"] or group["foreach"]
    loss, _ = causal_lm_loss(model, _batch(), chunk_size=16)
    loss.backward()
    before = model.model.layers[0].self_attn.q_proj.deltas["default"].lora_B.weight.clone()
    optimizer.step()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.deltas["default"].lora_B.weight)


def test_optimizer_needs_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(make_tiny_llama().requires_grad_(False), OptimConfig())


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_key_steps(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    m = lr_multiplier(cfg, total_steps=110)
    assert m(0) == 0.0 and m(5) == pytest.approx(0.5) and m(10) == pytest.approx(1.0)
    middle, end = {"cosine": (0.55, 0.1), "linear": (0.55, 0.1), "constant": (1.0, 1.0)}[schedule]
    assert m(60) == pytest.approx(middle) and m(110) == pytest.approx(end)
    if schedule == "cosine":
        assert m(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_schedule_matches_transformers_and_warmup_ratio():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for ours, theirs in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        m = lr_multiplier(OptimConfig(schedule=ours, warmup_ratio=0.1), total_steps=50)  # 5 warmup steps
        param = nn.Parameter(torch.zeros(1))
        reference = theirs(torch.optim.SGD([param], lr=1.0), num_warmup_steps=5, num_training_steps=50)
        assert [m(s) for s in range(51)] == pytest.approx([reference.lr_lambdas[0](s) for s in range(51)])


def test_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        lr_multiplier(OptimConfig(warmup_steps=20), total_steps=10)


def test_scheduler_scales_each_group_and_state_dict_round_trips():
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, loraplus_lr_ratio=16)

    def build():
        optimizer = build_optimizer(_lora_llama(), cfg)
        return optimizer, build_scheduler(optimizer, cfg, total_steps=10)

    optimizer, scheduler = build()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    m4 = lr_multiplier(cfg, 10)(4)
    assert _groups_by_name(optimizer)["lora_B"]["lr"] == pytest.approx(16e-3 * m4)
    assert _groups_by_name(optimizer)["default"]["lr"] == pytest.approx(1e-3 * m4)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    resumed_opt, resumed = build()
    resumed_opt.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    assert resumed.last_epoch == 4 and resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    scheduler.step()
    resumed.step()
    assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())


# ---- progress --------------------------------------------------------------------------------------------
def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_progress_writes_jsonl_and_plot(tmp_path):
    progress = Progress(total_steps=5, output_dir=tmp_path / "run")
    for step in range(1, 6):
        progress.log(step, {"loss": 3.0 - 0.1 * step, "lr": 1e-4 * step, "tokens": 100})
    progress.log(5, {"eval_loss": 2.5})
    progress.close()
    progress.close()  # idempotent
    lines = _lines(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 5]
    assert lines[0]["loss"] == pytest.approx(2.9) and lines[0]["lr"] == pytest.approx(1e-4)
    assert all({"time", "elapsed_s"} <= set(line) for line in lines)
    assert lines[1]["tokens_per_s"] > 0 and lines[-1] == {**lines[-1], "eval_loss": 2.5}
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_progress_resume_drops_lines_past_the_checkpoint(tmp_path):
    progress = Progress(total_steps=10, output_dir=tmp_path)
    for step in range(1, 8):
        progress.log(step, {"loss": 1.0, "lr": 1e-4})
    progress.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # the crash cut this line short
    resumed = Progress(total_steps=10, output_dir=tmp_path, start_step=5)
    resumed.log(6, {"loss": 0.5, "lr": 1e-4})
    resumed.close()
    lines = _lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6] and lines[-1]["loss"] == 0.5
    fresh = Progress(total_steps=10, output_dir=tmp_path)  # start_step 0: a new run starts the file anew
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_progress_disabled_writes_nothing(tmp_path):
    progress = Progress(total_steps=3, output_dir=tmp_path / "rank1", enabled=False)
    progress.log(1, {"loss": 1.0})
    progress.close()
    assert not (tmp_path / "rank1").exists()


def test_progress_tensorboard_missing_names_the_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Progress(total_steps=3, output_dir=tmp_path, tensorboard=True)


def test_plot_metrics_without_data(tmp_path):
    plot_metrics(tmp_path / "missing.jsonl", tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0


@pytest.mark.parametrize(("peft_type", "lr"), [("LORA", 2e-4), ("IA3", 3e-3), ("PROMPT_TUNING", 3e-2), ("FULL", 2e-5)])
def test_each_method_trains_at_its_recommended_lr_unless_one_is_given(peft_type, lr):
    assert dt.TrainConfig(adapter={"peft_type": peft_type}).optim.lr == pytest.approx(lr)
    assert dt.TrainConfig(adapter={"peft_type": peft_type}, optim={"lr": 1e-2}).optim.lr == 1e-2
    model = dt.attach(make_tiny_llama(), dt.IA3Config())
    assert build_optimizer(model, OptimConfig()).param_groups[0]["lr"] == pytest.approx(3e-3)
