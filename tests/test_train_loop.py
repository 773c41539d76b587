"""The training loop, checkpoints and step hooks, on the tiny Llama with a 17-word tokenizer.

Parity tests: batch 4 equals 4 accumulated batches of 1; a run killed and resumed equals a run never
interrupted (losses and weights); continued training starts from exactly the saved adapter.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core import registry
from deltatune.core.config import ConfigError
from deltatune.train.checkpoint import (
    CheckpointError, DataPosition, MARKER, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
)
from deltatune.train.hooks import Hook, step_hooks
from deltatune.train.loop import TrainingDiverged, train
from deltatune.train.optim import build_optimizer, build_scheduler
from deltatune.train.config import OptimConfig

from conftest import make_tiny_llama

WORDS = "the a cat dog sat ran on under mat log red blue big small and then".split()
SPECIALS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


def make_tokenizer():
    """A word-level tokenizer over WORDS with pad, eos and a two-role chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prompt_completion(n: int) -> list[dict]:
    """n prompt/completion pairs of varied lengths, deterministic."""
    animals, places = ["cat", "dog"], ["mat", "log"]
    out = []
    for i in range(n):
        prompt = " ".join(["the", animals[i % 2]] + ["big"] * (i % 3))
        completion = " ".join(["sat", "on", "the", places[(i // 2) % 2]] + ["and", "then", "ran"] * (i % 2))
        out.append({"prompt": prompt, "completion": completion})
    return out


def texts(n: int) -> list[dict]:
    return [{"text": " ".join(["the", "cat", "sat", "on", "the", "mat", "and", "then"] * (1 + i % 3))} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def run(tmp_path: Path, name: str, records: list[dict], tokenizer, *, hooks=(), **values):
    data = {"train": str(write_jsonl(tmp_path / f"{name}.jsonl", records)), **values.pop("data", {})}
    values.setdefault("adapter", ADAPTER)
    values.setdefault("precision", "fp32")
    return train(model=make_tiny_llama(), tokenizer=tokenizer, hooks=hooks, output_dir=str(tmp_path / name),
                 data=data, **values)


def saved(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return dt.read_adapter(adapter_dir)[1]


def assert_same_tensors(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m: f"{key}: {m}")


# ---- training --------------------------------------------------------------------------------------------
def test_loss_falls_and_outputs(tmp_path, tokenizer, capsys):
    # lm_head adapted too: the tiny model's tied head is too small for the attention/MLP adapters alone to move it
    result = run(tmp_path, "falls", prompt_completion(20), tokenizer, precision="auto", max_steps=12, batch_size=4,
                 optim={"lr": 1e-2, "schedule": "constant"}, data={"eval_fraction": 0.2}, eval_every=6,
                 adapter={**ADAPTER, "target_modules": r".*(proj|lm_head)"})
    losses = [result.losses[s] for s in range(1, 13)]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    printed = capsys.readouterr().out
    assert "precision: " in printed and "(held out)" in printed and "examples (prompt_completion)" in printed
    assert result.steps == 12 and result.last_loss == losses[-1]
    assert result.eval["eval_perplexity"] == pytest.approx(math.exp(result.eval["eval_loss"]))
    lines = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 13))
    assert [l["step"] for l in lines if "eval_loss" in l] == [6, 12]
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert (tmp_path / "falls" / "loss.png").is_file()
    assert result.adapter_dir == tmp_path / "falls" / "adapter"
    model = dt.load_adapter(make_tiny_llama(), result.adapter_dir)  # peft format, loads on a fresh base
    assert dt.adapter_configs(model)["default"].r == 4
    assert [p.name for p in list_checkpoints(tmp_path / "falls")] == ["step-000012"]


def test_batch_of_4_equals_4_accumulated_batches_of_1(tmp_path, tokenizer):
    records = prompt_completion(4)  # one global batch per step either way: the same examples in each step
    common = dict(max_steps=2, optim={"lr": 1e-3}, adapter={**ADAPTER, "init_lora_weights": "gaussian"})
    big = run(tmp_path, "b4", records, tokenizer, batch_size=4, grad_accum=1, **common)
    small = run(tmp_path, "b1x4", records, tokenizer, batch_size=1, grad_accum=4, **common)
    assert big.losses == pytest.approx(small.losses, rel=1e-6)
    assert_same_tensors(saved(big.adapter_dir), saved(small.adapter_dir), rtol=1e-5, atol=1e-7)


class Killed(Exception):
    pass


class KillAt(Hook):
    """Simulates a kill: raises after the optimizer step of `step`, before its log or checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            raise Killed(step)


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    # dropout (RNG), 2 micro-batches per step over 3 batches per epoch (resume mid-epoch), cosine schedule
    common = dict(max_steps=6, batch_size=2, grad_accum=2, save_every=3, optim={"lr": 5e-3, "warmup_steps": 2},
                  adapter={**ADAPTER, "lora_dropout": 0.1})
    records = prompt_completion(6)
    full = run(tmp_path, "full", records, tokenizer, **common)
    with pytest.raises(Killed):
        run(tmp_path, "cut", records, tokenizer, hooks=[KillAt(5)], **common)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000003"
    resumed = run(tmp_path, "cut", records, tokenizer, resume=True, **common)
    assert resumed.losses == {s: full.losses[s] for s in (4, 5, 6)}  # exactly
    assert_same_tensors(saved(resumed.adapter_dir), saved(full.adapter_dir), rtol=0, atol=0)
    logged = [json.loads(l) for l in resumed.metrics_path.read_text().splitlines()]
    assert [(l["step"], l["loss"]) for l in logged] == [(s, full.losses[s]) for s in range(1, 7)]


class PoisonAt(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer):
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*step-000003"):
        run(tmp_path, "nan", prompt_completion(4), tokenizer, hooks=[PoisonAt(4)], max_steps=6, batch_size=2,
            save_every=3)
    out = tmp_path / "nan"
    assert [p.name for p in list_checkpoints(out)] == ["step-000003"] and not (out / "adapter").exists()
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    load_checkpoint(latest_checkpoint(out), model=model)
    assert all(torch.isfinite(t).all() for t in dt.adapter_tensors(model, "default").values())


def test_continued_pretraining_then_sft_continues_the_adapter(tmp_path, tokenizer):
    cpt = run(tmp_path, "cpt", texts(6), tokenizer, max_steps=3, batch_size=2, optim={"lr": 1e-2},
              data={"packing": True, "max_length": 32})
    start = saved(cpt.adapter_dir)

    class Snapshot(Hook):
        def before_step(self, model, optimizer, step):
            if step == 1:  # gradients exist, weights not yet updated: the weights SFT starts from
                self.first = {k: v.detach().clone() for k, v in dt.adapter_tensors(model, "default").items()}
                self.checkpointing = getattr(model, "is_activation_checkpointing", None)

    snapshot = Snapshot()
    sft = run(tmp_path, "sft", prompt_completion(4), tokenizer, hooks=[snapshot], max_steps=2, batch_size=2,
              init_adapter=str(cpt.adapter_dir), gradient_checkpointing=True, adapter={**ADAPTER, "r": 8})
    assert_same_tensors(snapshot.first, start, rtol=0, atol=0)
    assert snapshot.checkpointing in (True, None)  # None: a transformers without is_activation_checkpointing
    after = saved(sft.adapter_dir)
    assert after.keys() == start.keys() and any(not torch.equal(after[k], start[k]) for k in start)
    assert dt.read_adapter(sft.adapter_dir)[0].r == 4  # the loaded adapter's config, not the adapter section


class Recorder(Hook):
    def __init__(self, log: list) -> None:
        self.log = log

    def before_step(self, model, optimizer, step):
        self.log.append(("before", step, self._grads_present(model), self._weights(model)))

    def on_step(self, model, optimizer, step):
        self.log.append(("on", step, self._grads_present(model), self._weights(model)))

    @staticmethod
    def _grads_present(model):
        return all(p.grad is not None for p in model.parameters() if p.requires_grad)

    @staticmethod
    def _weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).clone()


def test_hooks_run_in_order_with_gradients(tmp_path, tokenizer, monkeypatch):
    log: list = []
    made = []

    def factory(model, config, name):
        made.append((type(model).__name__, config.peft_type, name))
        return Recorder(log)

    monkeypatch.setitem(registry._METHODS, "LORA", dataclasses.replace(registry._METHODS["LORA"], step_hook=factory))
    explicit: list = []
    run(tmp_path, "hooks", prompt_completion(4), tokenizer, hooks=[Recorder(explicit)], max_steps=3, batch_size=2)
    assert made == [("LlamaForCausalLM", "LORA", "default")]
    for calls in (log, explicit):
        assert [(kind, step) for kind, step, *_ in calls] == [(k, s) for s in (1, 2, 3) for k in ("before", "on")]
        assert all(grads for _, _, grads, _ in calls)  # gradients present in both (zero_grad comes after)
        for before, on in zip(calls[::2], calls[1::2]):
            assert not torch.equal(before[3], on[3])  # optimizer.step ran in between


def test_step_hooks_skips_frozen_adapters_and_checks_extra_hooks(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._METHODS, "LORA",
                        dataclasses.replace(registry._METHODS["LORA"], step_hook=lambda m, c, n: Hook()))
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=2))
    dt.save_adapter(model, tmp_path / "a")
    dt.load_adapter(model, tmp_path / "a", name="frozen")  # inference_mode: no hook
    assert len(step_hooks(model)) == 1
    with pytest.raises(TypeError, match="no on_step"):
        step_hooks(model, [object()])


def test_errors_name_the_fix_and_resume_refuses_changed_settings(tmp_path, tokenizer, capsys):
    with pytest.raises(ConfigError, match="tokenizer"):
        train(model=make_tiny_llama(), data={"train": "x.jsonl"}, output_dir=str(tmp_path))
    run(tmp_path, "again", prompt_completion(2), tokenizer, max_steps=1, batch_size=2)
    with pytest.raises(ConfigError, match="resume: true"):
        run(tmp_path, "again", prompt_completion(2), tokenizer, max_steps=1, batch_size=2)
    with pytest.raises(ConfigError, match=r"settings differ .*: optim.lr 0.0002 -> 0.001\. .*--init_adapter .*step-000001"):
        run(tmp_path, "again", prompt_completion(2), tokenizer, max_steps=2, batch_size=2, resume=True, optim={"lr": 1e-3})
    result = run(tmp_path, "again", prompt_completion(2), tokenizer, max_steps=2, batch_size=2, resume=True,
                 save_every=1, log_every=2)  # the length of the run and bookkeeping may change
    assert list(result.losses) == [2]


def test_bf16_autocast_trains(tmp_path, tokenizer, capsys):
    result = run(tmp_path, "bf16", prompt_completion(4), tokenizer, precision="bf16", max_steps=2, batch_size=4)
    printed = capsys.readouterr().out
    assert "precision: bf16 autocast" in printed and "14 linear weights stored in bf16" in printed
    assert all(math.isfinite(v) for v in result.losses.values())
    assert all(t.dtype == torch.float32 for t in saved(result.adapter_dir).values())  # weights stay fp32


def test_frozen_bf16_base_trains_exactly_as_the_fp32_base_under_autocast(tmp_path, tokenizer):
    common = dict(precision="bf16", max_steps=3, batch_size=2)
    fast = run(tmp_path, "fast", prompt_completion(4), tokenizer, **common)
    kept = run(tmp_path, "kept", prompt_completion(4), tokenizer, frozen_bf16=False, **common)
    assert fast.losses == kept.losses
    assert_same_tensors(saved(fast.adapter_dir), saved(kept.adapter_dir), rtol=0, atol=0)


# ---- checkpoints -----------------------------------------------------------------------------------------
def _trained_parts():
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    optimizer = build_optimizer(model, OptimConfig())
    scheduler = build_scheduler(optimizer, OptimConfig(), 10)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(tmp_path, step, parts, keep_last=5):
    model, optimizer, scheduler = parts
    return save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           position=DataPosition(1, step), config={"seed": 0}, keep_last=keep_last)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    parts = _trained_parts()
    torch.manual_seed(123)
    path = _save(tmp_path, 7, parts)
    expected_draw = torch.rand(3)
    assert sorted(p.name for p in path.iterdir()) == ["adapter", MARKER, "state.json", "trainer_state.pt"]
    model, optimizer, scheduler = _trained_parts()
    for p in model.parameters():
        if p.requires_grad:
            p.data.zero_()
    fresh_opt = build_optimizer(model, OptimConfig())
    fresh_sched = build_scheduler(fresh_opt, OptimConfig(), 10)
    info = load_checkpoint(path, model=model, optimizer=fresh_opt, scheduler=fresh_sched)
    assert (info.step, info.position, info.config) == (7, DataPosition(1, 7), {"seed": 0})
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    assert_same_tensors(dt.adapter_tensors(model, "default"), dt.adapter_tensors(parts[0], "default"), rtol=0, atol=0)
    assert fresh_sched.state_dict()["last_epoch"] == 1
    state = fresh_opt.state_dict()["state"]
    assert len(state) == 8 and all(int(s["step"]) == 1 for s in state.values())


def test_incomplete_or_corrupt_checkpoints_are_skipped_and_refused(tmp_path):
    parts = _trained_parts()
    good = _save(tmp_path, 3, parts)
    root = good.parent
    unfinished = root / "step-000006"  # a copy killed before its marker was written
    shutil.copytree(good, unfinished)
    (unfinished / MARKER).unlink()
    shutil.copytree(good, root / ".tmp-step-000009-999")  # a temp dir never renamed
    with pytest.warns(UserWarning, match="no 'complete' marker"):
        assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="no 'complete' marker"):
        load_checkpoint(unfinished, model=parts[0])
    shutil.rmtree(unfinished)
    corrupt = root / "step-000012"
    shutil.copytree(good, corrupt)
    with open(corrupt / "trainer_state.pt", "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="corrupted"):
        assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="trainer_state.pt has 100 bytes"):
        load_checkpoint(corrupt, model=parts[0])


def test_keep_last_prunes_old_checkpoints_after_the_new_one_lands(tmp_path):
    parts = _trained_parts()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, parts, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path).name == "step-000004"


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    model, optimizer, scheduler = _trained_parts()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
    with pytest.raises(CheckpointError, match="NaN/Inf at step 2"):
        _save(tmp_path, 2, (model, optimizer, scheduler))
    assert list(tmp_path.rglob("*")) == []  # not even a temp dir
