"""Issue 8's fault classes outside the core, one test per class (docs/faults.md lists them): no silent wrong
result, no lost work, no traceback. From the CLI every expected failure is one line and exit status 2;
from Python a deltatune exception type."""
from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.core.config import ConfigError
from deltatune.data import DataError, load_records, tokenize
from deltatune.train.checkpoint import CheckpointError, list_checkpoints
from deltatune.train.config import OptimConfig, TrainConfig, load_config
from deltatune.train.lock import LOCK_FILE, RunLockedError, output_dir_lock
from deltatune.train.loop import TrainingDiverged, TrainingInterrupted

from test_cli import chats, model_dir, run as cli  # noqa: F401 (fixtures)
from test_train_loop import PoisonAt, make_tokenizer, prompt_completion, run, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def one_error_line(err: str, command: str) -> str:
    """The one error line of stderr; progress bars drawn before the failure (tqdm: `NN%|`) do not count."""
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith(f"deltatune {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- silent wrong results and lost work ----------------------------------------------------------------
def test_a_second_run_into_a_locked_output_dir_is_refused_and_a_dead_runs_lock_is_not(tmp_path, tokenizer):
    out = tmp_path / "locked"
    with output_dir_lock(out):  # another live run holds it (flock conflicts across open files, even in-process)
        with pytest.raises(RunLockedError, match=r"in use by a running training \(pid \d+"):
            run(tmp_path, "locked", prompt_completion(2), tokenizer, max_steps=1, batch_size=2)
    assert not (out / LOCK_FILE).exists()  # released and removed
    (out / LOCK_FILE).write_text("pid 999999 on crashed-host\n")  # left by a kill -9: no flock holds it
    assert run(tmp_path, "locked", prompt_completion(2), tokenizer, max_steps=1, batch_size=2).steps == 1


@pytest.mark.parametrize("values, named", [
    ({"optim": {"max_grad_norm": -1.0}}, "optim.max_grad_norm"),
    ({"optim": {"lr": 0.0}}, "optim.lr"),
    ({"optim": {"lr": math.inf}}, "optim.lr"),
    ({"optim": {"lr": math.nan}}, "optim.lr"),
    ({"optim": {"betas": (0.9, 1.0)}}, r"optim.betas\[1\]"),
    ({"optim": {"betas": (-0.1, 0.9)}}, r"optim.betas\[0\]"),
    ({"optim": {"eps": 0.0}}, "optim.eps"),
    ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay"),
    ({"optim": {"warmup_steps": 200}}, "optim.warmup_steps"),
    ({"optim": {"warmup_ratio": 1.5}}, "optim.warmup_ratio"),
    ({"optim": {"warmup_steps": 2, "warmup_ratio": 0.1}}, "choose one"),
    ({"optim": {"min_lr_ratio": 1.5}}, "optim.min_lr_ratio"),
    ({"optim": {"loraplus_lr_ratio": math.nan}}, "optim.loraplus_lr_ratio"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**40}, "seed"),
    ({"batch_size": 0}, "batch_size"),
    ({"grad_accum": -1}, "grad_accum"),
    ({"save_every": -5}, "save_every"),
    ({"data": {"max_length": 1}}, "data.max_length"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
    ({"data": {"eval": "e.jsonl", "eval_fraction": 0.1}}, "choose one"),
    ({"output_dir": " "}, "output_dir"),
])
def test_every_numeric_setting_is_range_checked_before_anything_runs(values, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, **values)


@pytest.mark.parametrize("make, named", [
    (lambda: TrainConfig(batch_size="4"), "batch_size must be an integer, got '4'"),
    (lambda: TrainConfig(resume="yes"), "resume must be true or false"),
    (lambda: TrainConfig(data="x.jsonl"), "data must be a mapping of"),
    (lambda: OptimConfig(lr="1e-3"), "optim.lr must be a number"),
    (lambda: TrainConfig(optim={"lr": "fast"}), "optim.lr must be a number"),
    (lambda: TrainConfig(optim={"lrr": 1.0}), "unknown config key optim.lrr"),
    (lambda: TrainConfig(precision="bf17"), "precision must be one of"),
    (lambda: TrainConfig(adapter={"peft_type": "LORA", "lora_alpha": "sixteen"}), "adapter.lora_alpha must be a number"),
    (lambda: TrainConfig(adapter={"peft_type": "LORA", "target_modules": 5}), "adapter.target_modules must be a string"),
    (lambda: TrainConfig(adapter={"peft_type": "LORA", "lora_dropout": "0.1"}), "adapter.lora_dropout must be a number"),
])
def test_wrong_types_from_python_are_config_errors_naming_the_field(make, named):
    with pytest.raises(ConfigError, match=named):
        make()


def test_text_from_yaml_and_the_command_line_is_converted_to_the_fields_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + b"optim: {lr: 1e-3, betas: [0.9, 1.0e-1]}\nadapter: {r: '8', lora_alpha: 1e1}\n")
    cfg = load_config(path, ["--optim.eps", "1e-6", "--output_dir", "1e5", "--data.eval", "null", "--resume", "yes"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps) == (1e-3, (0.9, 0.1), 1e-6)
    assert cfg.adapter_config().r == 8 and cfg.adapter_config().lora_alpha == 10.0
    assert (cfg.output_dir, cfg.data.eval, cfg.resume) == ("1e5", None, True)
    assert TrainConfig(optim={"lr": 1e-3}).optim == OptimConfig(lr=1e-3)  # a mapping for a section is accepted
    with pytest.raises(ConfigError, match="batch_size must be an integer, got 4.5"):
        load_config(None, ["--batch_size", "4.5"])


def test_resume_false_never_overwrites_a_finished_adapter(tmp_path, tokenizer):
    import shutil

    run(tmp_path, "done", prompt_completion(2), tokenizer, max_steps=1, batch_size=2)
    shutil.rmtree(tmp_path / "done" / "checkpoints")
    before = (tmp_path / "done" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a finished adapter"):
        run(tmp_path, "done", prompt_completion(2), tokenizer, max_steps=1, batch_size=2)
    with pytest.raises(ConfigError, match="no checkpoint to resume from, only a finished adapter.*init_adapter"):
        run(tmp_path, "done", prompt_completion(2), tokenizer, max_steps=2, batch_size=2, resume=True)
    assert (tmp_path / "done" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_a_step_that_makes_weights_nan_stops_at_the_checkpoint_naming_the_last_good_one(tmp_path, tokenizer):
    with pytest.raises(TrainingDiverged, match=r"step 4: adapter tensor .* NaN/Inf after the optimizer step.*"
                                               r"step-000002.*--init_adapter"):
        run(tmp_path, "poison", prompt_completion(4), tokenizer, hooks=[PoisonAt(4)], max_steps=6, batch_size=2,
            save_every=2)
    out = tmp_path / "poison"
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"] and (out / "loss.png").is_file()


def test_huge_lr_from_the_cli_ends_in_one_line(tmp_path, model_dir, chats, capsys):
    code, _, err = cli(["train", "--model", str(model_dir), "--data.train", str(chats), "--output_dir",
                        str(tmp_path / "lr"), "--max_steps", "4", "--save_every", "1", "--batch_size", "2",
                        "--optim.lr", "1e30", "--optim.max_grad_norm", "0", "--precision", "fp32", "--threads", "1"],
                       capsys)
    line = one_error_line(err, "train")
    assert code == 2 and re.search(r"step \d: (loss nan|gradient norm|adapter tensor)", line) and "step-000001" in line


def test_a_corrupted_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, tokenizer, capsys):
    common = dict(batch_size=2, save_every=1, keep_last=3)
    run(tmp_path, "bad", prompt_completion(4), tokenizer, max_steps=2, **common)
    state = tmp_path / "bad" / "checkpoints" / "step-000002" / "trainer_state.pt"
    state.write_bytes(b"\x00" * state.stat().st_size)  # same size: only reading it tells
    capsys.readouterr()
    result = run(tmp_path, "bad", prompt_completion(4), tokenizer, max_steps=3, resume=True, **common)
    printed = capsys.readouterr().out
    assert "skipping a damaged checkpoint" in printed and "resumed from" in printed and "step-000001 at step 1" in printed
    assert list(result.losses) == [2, 3]
    for step in ("step-000001", "step-000002", "step-000003"):  # nothing intact left: refused, not step 0
        target = tmp_path / "bad" / "checkpoints" / step / "trainer_state.pt"
        target.write_bytes(b"\x00" * target.stat().st_size)
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        run(tmp_path, "bad", prompt_completion(4), tokenizer, max_steps=4, resume=True, **common)


# ---- tracebacks to clear errors ----------------------------------------------------------------------------
def test_non_utf8_data_names_file_and_line_and_a_bom_is_accepted(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14\)"):
        load_records(bad)
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf[{"text": "a"}]')
    assert load_records(tmp_path / "bom.jsonl") == load_records(tmp_path / "bom.json") == [{"text": "a"}]
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl:1: invalid JSON: nested too deeply"):
        load_records(tmp_path / "deep.jsonl")
    (tmp_path / "run.yaml").write_bytes(b"seed: 1\nmodel: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run.yaml:2: not UTF-8"):
        load_config(tmp_path / "run.yaml")


def test_os_errors_are_reported_once_as_the_original_error(tmp_path, model_dir, chats, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(["train", "--model", str(model_dir), "--data.train", str(chats), "--output_dir",
                        str(tmp_path / "file")], capsys)
    assert code == 2 and "output_dir" in one_error_line(err, "train") and "not a directory" in err

    import deltatune.train.loop as loop

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "full"))

    monkeypatch.setattr(loop, "save_checkpoint", disk_full)
    code, _, err = cli(["train", "--model", str(model_dir), "--data.train", str(chats), "--output_dir",
                        str(tmp_path / "full"), "--max_steps", "1", "--batch_size", "2", "--precision", "fp32"], capsys)
    line = one_error_line(err, "train")
    assert code == 2 and "No space left on device" in line and str(tmp_path / "full") in line
    assert not (tmp_path / "full" / "loss.png").exists()  # nothing plotted after the error


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, tokenizer, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        run(tmp_path, "tb", prompt_completion(2), tokenizer, max_steps=1, batch_size=2, tensorboard=True)
    assert not (tmp_path / "tb").exists()  # refused before anything was written


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command_without_saving(tmp_path, model_dir, chats, capsys,
                                                                                 monkeypatch):
    import deltatune.train.loop as loop

    real = loop.run_on_step

    def interrupt_at_3(hooks, model, optimizer, step):
        real(hooks, model, optimizer, step)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_on_step", interrupt_at_3)
    argv = ["train", "--model", str(model_dir), "--data.train", str(chats), "--output_dir", str(tmp_path / "c"),
            "--max_steps", "4", "--save_every", "2", "--batch_size", "2", "--precision", "fp32", "--resume", "false"]
    code, _, err = cli(argv, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err
    assert last.startswith("deltatune train: interrupted; nothing else was saved; the last checkpoint is ")
    assert "step-000002 (step 2)" in last
    command = shlex.split(last.split("resume with: ")[1])
    assert command[:2] == ["deltatune", "train"] and command[-2:] == ["--resume", "true"] and "false" not in command
    assert [p.name for p in list_checkpoints(tmp_path / "c")] == ["step-000002"]  # no extra save
    with pytest.raises(TrainingInterrupted) as caught:  # from Python: a KeyboardInterrupt carrying the same facts
        loop.train(model=str(model_dir), data={"train": str(chats)}, output_dir=str(tmp_path / "py"), max_steps=4,
                   save_every=2, batch_size=2, precision="fp32")
    assert caught.value.step == 2 and caught.value.checkpoint.name == "step-000002"
    monkeypatch.setattr(loop, "run_on_step", real)
    code, _, err = cli(command[1:], capsys)
    assert code == 0, err


def test_a_huge_record_is_cut_before_tokenizing_with_the_same_first_tokens(tokenizer, monkeypatch):
    import deltatune.data.encode as encode

    words = " ".join(["the cat sat on the mat"] * 2_000)  # ~45k characters: far over the budget at max_length 16
    records = [{"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": "ran"}]},
               {"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": words}]},
               {"prompt": "the", "completion": words}]
    for batch in (records[:2], records[2:]):
        cut = tokenize(batch, tokenizer, max_length=16)
        with monkeypatch.context() as m:
            m.setattr(encode, "_char_budget", lambda *a: None)  # the whole record tokenized, then truncated
            whole = tokenize(batch, tokenizer, max_length=16)
        assert cut == whole  # parity: same examples, same report
    examples, report = tokenize(records[:1] * 2 + [{"messages": [{"role": "user", "content": "the"},
                                                                  {"role": "assistant", "content": "cat"}]}],
                                tokenizer, max_length=16, overlong="skip")
    assert report.skipped == 2 and len(examples) == 1
    big = {"prompt": "the", "completion": " ".join(["the cat sat on the mat"] * 2_000_000)}  # ~45 MB
    calls = []
    real_call = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text))
        return real_call(self, text, *args, **kwargs)

    try:
        type(tokenizer).__call__ = counting
        (example,), report = tokenize([big], tokenizer, max_length=512)
    finally:
        type(tokenizer).__call__ = real_call
    assert report.truncated == 1 and len(example["input_ids"]) == 512 and max(calls) < 100_000


# ---- what a new user trips over ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, named", [
    (["generate", "--promt", "x"], "unknown argument --promt; did you mean --prompt?"),
    (["eval", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["eval", "--limit", "-1", "--data", "x.jsonl"], "--limit must be >= 0"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["train", "--threads", "-2"], "--threads must be >= 0"),
    (["merge", "--adapter", "a"], "required: --out"),
    (["inspect", "/nonexistent/adapter"], "/nonexistent/adapter"),
    (["eval", "--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["train", "--tensorboard", "maybe"], "tensorboard must be true or false"),
])
def test_usage_errors_are_one_line_naming_the_flag(argv, named, capsys):
    code, _, err = cli(argv, capsys)
    assert code == 2 and named in one_error_line(err, argv[0])


def test_generate_takes_a_system_prompt_and_the_demo_hint_runs_as_printed(model_dir, capsys):
    from deltatune.demo import data_path, try_command
    from deltatune.train.evaluate import prompt_ids

    tok = dt.models.load_model(str(model_dir))[1] if hasattr(dt, "models") else None
    from deltatune.models import load_model

    model, tok = load_model(str(model_dir))
    ids = prompt_ids(tok, "the cat", system="a dog")
    assert tok.convert_tokens_to_ids("<|system|>") in ids
    adapter = model_dir.parent / "hint-adapter"
    dt.save_adapter(dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"])), adapter)
    messages = load_records(data_path("test"))[0]["messages"]
    hint = try_command(adapter, messages, str(model_dir))
    argv = shlex.split(hint)
    assert argv[:2] == ["deltatune", "generate"] and "--system" in argv and messages[0]["content"] in argv
    code, _, err = cli(argv[1:] + ["--max-new-tokens", "2", "--threads", "1"], capsys)
    assert code == 0, err
    code, _, err = cli(["generate", "--base", str(model_dir), "--raw", "--system", "x", "--prompt", "y"], capsys)
    assert code == 2 and "--system" in one_error_line(err, "generate")


def test_info_prints_linear_shapes_as_pytorch_and_loading_is_quiet(model_dir, capsys):
    code, out, err = cli(["info", str(model_dir)], capsys)
    assert code == 0 and "Linear(in_features=64, out_features=32)" in out  # k_proj: 64 in, 2 kv heads x 16 out
    assert "Loading weights" not in err and "Warning" not in err


def test_commands_choose_their_threads_and_show_eval_progress(tmp_path, model_dir, chats, capsys):
    previous = torch.get_num_threads()
    try:
        code, out, err = cli(["eval", "--base", str(model_dir), "--data", str(chats), "--max-new-tokens", "2",
                              "--threads", "1"], capsys)
    finally:
        torch.set_num_threads(previous)
    assert code == 0 and "using 1 CPU thread (--threads)" in out
    assert "eval loss" in err and "generating" in err  # the bars (tqdm, on stderr)


def test_train_package_imports_and_calls_and_train_takes_a_model_path(tmp_path, model_dir, chats):
    import deltatune.train.evaluate as evaluate

    assert callable(evaluate.eval_loss) and callable(dt.train)
    result = dt.train(model=str(model_dir), data={"train": str(chats)}, output_dir=str(tmp_path / "path"),
                      max_steps=1, batch_size=2, precision="fp32")  # the tokenizer comes from the path
    assert result.steps == 1
    with pytest.raises(ConfigError, match="model= must be"):
        dt.train(model=42, data={"train": str(chats)})
