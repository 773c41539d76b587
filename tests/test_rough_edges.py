"""What a new user hit (issue 14): silent wrong results and raw tracebacks, each now a result or one clear line."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt

from conftest import make_tiny_llama
from test_cli import TINY_LORA, chats, model_dir, run  # noqa: F401  (fixtures)


def randomize(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))


def test_merged_bitfit_on_a_bias_free_llama_loads_in_plain_transformers(tmp_path, model_dir, capsys):  # noqa: F811
    """The added biases were written while the config said attention_bias/mlp_bias false, so transformers
    dropped them and the merged model answered like the base. Now the config declares them."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = dt.attach(base, dt.BitFitConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(model)
    dt.save_adapter(model, tmp_path / "bitfit")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    code, _, err = run(["merge", "--base", str(model_dir), "--adapter", str(tmp_path / "bitfit"),
                        "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert "merging" in err and "writing the merged model" in err  # progress, not silence
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.config.attention_bias and plain.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_python_merge_and_unload_of_added_biases_saves_a_model_plain_transformers_loads(tmp_path, model_dir):  # noqa: F811
    """The same from Python: dt.merge_and_unload declares the biases, so save_pretrained keeps them."""
    from transformers import AutoModelForCausalLM

    model = dt.attach(AutoModelForCausalLM.from_pretrained(model_dir), dt.BitFitConfig(target_modules=["q_proj", "down_proj"]))
    randomize(model)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    dt.merge_and_unload(model).save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert plain.config.attention_bias and plain.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_python_merge_and_unload_warns_where_the_architecture_cannot_declare_added_biases():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    model = dt.attach(MistralForCausalLM(config), dt.BitFitConfig(add_biases=True, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="cannot declare .*a saved copy would load without them"):
        merged = dt.merge_and_unload(model)
    assert merged.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("config", [dt.PromptTuningConfig(num_virtual_tokens=3), dt.BottleneckConfig()])
def test_merge_of_an_unmergeable_adapter_is_refused_before_loading(tmp_path, capsys, monkeypatch, config):
    from deltatune import commands

    dt.save_adapter(dt.attach(make_tiny_llama(), config), tmp_path / "adapter")
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("the model was loaded"), raising=False)
    import deltatune.models
    monkeypatch.setattr(deltatune.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot be merged" in err
    assert config.peft_type in err and not (tmp_path / "out").exists()


def test_a_full_disk_while_checkpointing_says_so(tmp_path, model_dir, chats, capsys, monkeypatch):  # noqa: F811
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("trainer_state.pt") or "trainer" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run(["train", "--model", str(model_dir), "--data.train", str(chats), "--max_steps", "2",
                        "--batch_size", "2", "--save_every", "1", "--output_dir", str(tmp_path / "run"), *TINY_LORA],
                       capsys)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "writing checkpoint" in line and "disk" in line and "MiB are free" in line
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint left


def test_training_a_merged_adapter_says_merged_adapters_do_not_train():
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=2))
    dt.merge(model)
    model.train()
    with pytest.raises(RuntimeError, match="merged into the base weights, and a merged adapter does not train"):
        model(torch.randint(0, 256, (1, 5))).logits.sum().backward()
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)))  # running the merged model is fine
    dt.unmerge(model)
    model.train()
    model(torch.randint(0, 256, (1, 5))).logits.sum().backward()  # unmerged, it trains


def test_route_per_token_takes_rows_of_names():
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=2, init_lora_weights=False), "a")
    ids = torch.randint(0, 256, (4, 3))
    with torch.no_grad():
        alone = model(ids).logits
        with dt.route(model, [["a"] * 3] * 4, per_token=True):
            routed = model(ids).logits
    torch.testing.assert_close(routed, alone)
    with pytest.raises(TypeError, match="per_token=True"):
        with dt.route(model, [["a"] * 3] * 4):
            pass
    with pytest.raises(TypeError, match="position 1 is 3"):
        with dt.route(model, ["a", 3]):
            pass


def test_negative_lora_alpha_is_refused_naming_it(capsys):
    with pytest.raises(dt.ConfigError, match="lora_alpha must be positive"):
        dt.LoraConfig(lora_alpha=-16)
    code, _, err = run(["train", "--adapter.lora_alpha", "-16"], capsys)
    assert code == 2 and "lora_alpha" in err


def test_bitfit_file_loads_where_a_lora_wraps_the_same_module(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def with_biases():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, attention_bias=True)).eval()

    model = dt.attach(with_biases(), dt.BitFitConfig())
    randomize(model)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
    dt.save_adapter(model, tmp_path / "bitfit")
    both = dt.attach(with_biases(), dt.LoraConfig(r=2, target_modules=["q_proj"]), "lora")  # B = 0: a no-op
    dt.load_adapter(both, tmp_path / "bitfit", "bitfit")
    dt.set_active(both, ["lora", "bitfit"])
    with torch.no_grad():
        torch.testing.assert_close(both(ids).logits, expected)
    dt.save_adapter(both, tmp_path / "again", "bitfit")  # saved while wrapped: loads onto a plain model too
    plain = dt.load_adapter(with_biases(), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected)


def test_training_prints_trainable_parameters_and_resumed_elapsed_time_continues(tmp_path, model_dir, chats, capsys):  # noqa: F811
    import time

    flags = ["--model", str(model_dir), "--data.train", str(chats), "--batch_size", "2", "--save_every", "1",
             "--output_dir", str(tmp_path / "run"), *TINY_LORA]
    code, out, err = run(["train", *flags, "--max_steps", "2"], capsys)
    assert code == 0, err
    assert "trainable params: " in out and "|| all params: " in out and "|| trainable%: " in out
    time.sleep(0.3)
    code, out, err = run(["train", *flags, "--max_steps", "4", "--resume", "true"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in lines if "loss" in r}
    assert elapsed[3] > elapsed[2]  # continued from the first run's count, not from 0


def test_print_trainable_parameters_from_python(capsys):
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=4))
    dt.print_trainable_parameters(model)
    trainable, total = dt.trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                               f"trainable%: {100 * trainable / total:.4f}")


@pytest.mark.parametrize("argv, suggested", [
    (["--learning_rate", "1e-3"], "learning_rate (deltatune's key: optim.lr)"),
    (["--num_train_epochs", "3"], "num_train_epochs (deltatune's key: max_steps"),
    (["--per_device_train_batch_size", "4"], "(deltatune's key: batch_size)"),
    (["--max_step", "3"], "(did you mean max_steps?)"),
])
def test_hugging_face_spellings_get_deltatune_keys_suggested(argv, suggested, capsys):
    code, _, err = run(["train", *argv], capsys)
    assert code == 2 and suggested in err


def test_lower_case_method_names_are_accepted_and_files_keep_peft_spelling():
    from deltatune.train.config import load_config

    config = load_config(None, ["--adapter.peft_type", "ia3", "--data.train", "x.jsonl"])
    assert type(config.adapter_config()).__name__ == "IA3Config" and config.adapter["peft_type"] == "IA3"
    assert load_config(None, ["--adapter.peft_type", "prompt-tuning"]).adapter_config().peft_type == "PROMPT_TUNING"


def test_merged_added_biases_an_architecture_cannot_declare_are_refused():
    from transformers import MistralConfig, MistralForCausalLM

    from deltatune.commands import CommandError, declare_added_biases

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)  # no *_bias flag at all
    model = dt.attach(MistralForCausalLM(config), dt.BitFitConfig(add_biases=True, target_modules=["q_proj"]))
    with pytest.raises(CommandError, match="cannot declare .*q_proj.bias"):
        declare_added_biases(dt.merge_and_unload(model))
    assert declare_added_biases(dt.merge_and_unload(dt.attach(make_tiny_llama(), dt.LoraConfig(r=2)))) == []
