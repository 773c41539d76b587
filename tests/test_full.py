"""FULL: full fine-tuning through the selection mechanism; every tensor in the file, originals restored exactly,
and one flag from `deltatune train` (the baseline of "LoRA Without Regret")."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import make_tiny_llama, no_grad_logits
from deltatune.train.config import load_config


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_parameter_trained_saved_and_restored_exactly(input_ids, tmp_path):
    model = make_tiny_llama()
    original, base = _state(model), no_grad_logits(model, input_ids)
    dt.attach(model, dt.FullConfig())
    trainable, total = dt.trainable_parameters(model)
    assert trainable == total
    names = [n for n, _ in model.named_parameters()]  # the tied lm_head is embed_tokens, once
    assert list(dt.adapter_tensors(model, "default")) == [f"base_model.model.{n}" for n in names]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = no_grad_logits(model, input_ids)
    assert all(not torch.equal(p, original[n]) for n, p in model.named_parameters() if "norm" not in n)
    with dt.disable_adapters(model):
        torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)
    dt.merge(model)  # nothing to fold: the weights are the model's
    torch.testing.assert_close(no_grad_logits(model, input_ids), trained, atol=0, rtol=0)
    dt.save_adapter(model, tmp_path)
    config, tensors, _ = dt.read_adapter(tmp_path)
    assert config.peft_type == "FULL" and set(tensors) == {f"base_model.model.{n}" for n in names}
    loaded = dt.load_adapter(make_tiny_llama(seed=5), tmp_path)  # every tensor is in the file
    torch.testing.assert_close(no_grad_logits(loaded, input_ids), trained, atol=0, rtol=0)
    with pytest.raises(ValueError, match="trains base parameters in place \\(FULL\\)"):
        with dt.route(model, ["default", None, None]):
            pass
    dt.delete_adapter(model, "default")
    now = model.state_dict()
    assert list(now) == list(original) and all(torch.equal(now[k], v) for k, v in original.items())


def test_target_modules_limit_it_to_some_modules():
    model = make_tiny_llama()
    dt.attach(model, dt.FullConfig(target_modules=["mlp"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")]
    model = make_tiny_llama()
    dt.attach(model, dt.FullConfig(target_modules="all-linear", layers_to_transform=[1]))
    assert len([p for p in model.parameters() if p.requires_grad]) == 7  # the 7 Linears of layer 1, not lm_head


def test_full_with_lora_attached_trains_the_base_under_its_logical_names(input_ids):
    model = make_tiny_llama()
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), "lora")
    dt.attach(model, dt.FullConfig(target_modules=["self_attn"]), "full")
    lora_ids = {id(t) for t in dt.adapter_tensors(model, "lora").values()}
    full = dt.adapter_tensors(model, "full")
    assert not lora_ids & {id(t) for t in full.values()}  # another adapter's tensors are never selected
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in full  # the parameter's name


def test_peft_refuses_the_file(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny_llama()
    dt.attach(model, dt.FullConfig(target_modules=["mlp"]))
    dt.save_adapter(model, tmp_path)
    assert dt.registered_methods()["FULL"].readers == ("deltatune",)
    with pytest.raises(KeyError, match="FULL"):
        peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))


@pytest.mark.parametrize(("flags", "expected"), [
    (["--adapter.peft_type", "FULL"], dt.FullConfig()),
    (["--adapter.peft_type", "BITFIT"], dt.BitFitConfig()),
    (["--adapter.peft_type", "BITFIT", "--adapter.add_biases", "true"], dt.BitFitConfig(add_biases=True)),
    (["--adapter.peft_type", "BOTTLENECK", "--adapter.reduction_factor", "8", "--adapter.activation", "relu"],
     dt.BottleneckConfig(reduction_factor=8, activation="relu")),
])
def test_one_flag_on_the_command_line_picks_the_method(flags, expected):
    assert load_config(overrides=flags).adapter_config() == expected


def test_deltatune_train_runs_full_fine_tuning(tmp_path):
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", prompt_completion(8)))}
    result = dt.train(overrides=["--adapter.peft_type", "FULL"], model=make_tiny_llama(), tokenizer=make_tokenizer(),
                      output_dir=str(tmp_path / "run"), data=data, precision="fp32", max_steps=3, batch_size=4,
                      optim={"lr": 1e-3, "schedule": "constant"})
    losses = [result.losses[s] for s in range(1, 4)]
    assert losses[-1] < losses[0], losses
    config, tensors, _ = dt.read_adapter(result.adapter_dir)
    assert config.peft_type == "FULL"
    assert set(tensors) == {f"base_model.model.{n}" for n, _ in make_tiny_llama().named_parameters()}
