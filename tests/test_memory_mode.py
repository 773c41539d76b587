"""Memory mode through the training loop: `gradient_checkpointing: true | false | "selective" | "narrow"`.

Parity tests: every checkpointing policy trains exactly as no checkpointing (losses and saved adapters equal
bit for bit, fp32 and bf16 autocast); a run resumed under selective checkpointing equals one never
interrupted; the key is read from YAML, the command line and Python alike, and a wrong value is refused
naming the key before anything runs.
"""
from __future__ import annotations

import pytest

from deltatune.core.config import ConfigError
from deltatune.train.checkpoint import latest_checkpoint
from deltatune.train.config import TrainConfig, load_config
from deltatune.train.loop import train

from conftest import make_tiny_llama
from test_train_loop import ADAPTER, Killed, KillAt, assert_same_tensors, prompt_completion, run, saved


@pytest.fixture(scope="module")
def tokenizer():
    from test_train_loop import make_tokenizer

    return make_tokenizer()


def test_the_key_reads_from_yaml_the_command_line_and_python(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("gradient_checkpointing: selective\n")
    assert load_config(path).gradient_checkpointing == "selective"
    path.write_text("gradient_checkpointing: true\n")
    assert load_config(path).gradient_checkpointing is True
    assert load_config(overrides=["--gradient_checkpointing", "selective"]).gradient_checkpointing == "selective"
    assert load_config(overrides=["--gradient_checkpointing=false"]).gradient_checkpointing is False
    assert TrainConfig(gradient_checkpointing="selective").gradient_checkpointing == "selective"
    assert load_config(overrides=["--gradient_checkpointing", "narrow"]).gradient_checkpointing == "narrow"
    assert TrainConfig().gradient_checkpointing is False
    for bad in ("full", "Selective", 1):
        with pytest.raises(ConfigError, match=r"gradient_checkpointing must be true or false or one of 'selective', 'narrow'"):
            TrainConfig(gradient_checkpointing=bad)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(overrides=["--gradient_checkpointing", "selectve"])


def test_a_wrong_value_is_refused_before_anything_runs(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        train(model=make_tiny_llama(), tokenizer=tokenizer, output_dir=str(tmp_path / "out"),
              data={"train": str(tmp_path / "missing.jsonl")}, gradient_checkpointing="some")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_policy_trains_exactly_as_no_checkpointing(tmp_path, tokenizer, precision):
    # dropout: the recomputed forward must draw the same masks (the RNG state is restored for it)
    common = dict(precision=precision, max_steps=2, batch_size=2, optim={"lr": 5e-3},
                  adapter={**ADAPTER, "lora_dropout": 0.1, "init_lora_weights": "gaussian"})
    plain = run(tmp_path, "none", prompt_completion(4), tokenizer, **common)
    for policy in (True, "selective", "narrow"):
        other = run(tmp_path, str(policy), prompt_completion(4), tokenizer, gradient_checkpointing=policy, **common)
        assert other.losses == plain.losses, policy
        assert_same_tensors(saved(other.adapter_dir), saved(plain.adapter_dir), rtol=0, atol=0)


def test_resume_under_selective_checkpointing_equals_uninterrupted_run(tmp_path, tokenizer):
    common = dict(max_steps=4, batch_size=2, grad_accum=2, save_every=2, optim={"lr": 5e-3, "warmup_steps": 1},
                  adapter={**ADAPTER, "lora_dropout": 0.1})
    records = prompt_completion(6)
    full = run(tmp_path, "full", records, tokenizer, gradient_checkpointing="selective", **common)
    with pytest.raises(Killed):
        run(tmp_path, "cut", records, tokenizer, hooks=[KillAt(3)], gradient_checkpointing="selective", **common)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    resumed = run(tmp_path, "cut", records, tokenizer, resume=True, gradient_checkpointing="selective", **common)
    assert resumed.losses == {s: full.losses[s] for s in (3, 4)}  # exactly
    assert_same_tensors(saved(resumed.adapter_dir), saved(full.adapter_dir), rtol=0, atol=0)


def test_resume_may_switch_the_checkpointing_policy(tmp_path, tokenizer):
    # it changes what is kept for the backward, not what is computed: a run may go on in memory mode
    common = dict(max_steps=4, batch_size=2, save_every=2, optim={"lr": 5e-3})
    records = prompt_completion(4)
    full = run(tmp_path, "full", records, tokenizer, **common)
    with pytest.raises(Killed):
        run(tmp_path, "cut", records, tokenizer, hooks=[KillAt(3)], **common)
    resumed = run(tmp_path, "cut", records, tokenizer, resume=True, gradient_checkpointing="selective", **common)
    assert resumed.losses == {s: full.losses[s] for s in (3, 4)}
    assert_same_tensors(saved(resumed.adapter_dir), saved(full.adapter_dir), rtol=0, atol=0)
