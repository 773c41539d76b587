"""FishMask: the sparse delta against the formula (forward, merge), the Fisher against per-example autograd on the
weights, the batch approximation against its own formula, the global top-k, file bytes against k·(4+4), errors
naming the field, and a run through train() whose pre-pass chooses the mask."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, make_tiny_llama, no_grad_logits
from deltatune.methods import fishmask as fm
from deltatune.train.prepass import local_data

QV = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (6 + i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def fitted(keep=0.02, fisher="empirical", n=6, targets=("q_proj", "v_proj", "down_proj")):
    model = make_tiny_llama()
    dt.attach(model, dt.FishMaskConfig(target_modules=list(targets), keep_fraction=keep, num_examples=n, fisher=fisher,
                                       batch_size=3))
    fm.fisher_prepass(model, dt.adapter_configs(model)["default"], "default", local_data(examples(n)))
    return model


def manual_fisher(per_example: bool, n=6, batch=3):
    """(∂ mean log p / ∂W)² averaged over examples (or batches), by autograd on the base weights themselves."""
    model = make_tiny_llama()
    weights = {name: model.get_submodule(name).weight for name in QV}
    for w in weights.values():
        w.requires_grad_(True)
    data = local_data(examples(n))
    size = 1 if per_example else batch
    total = {k: torch.zeros_like(w) for k, w in weights.items()}
    count = 0
    for start in range(0, n, size):
        loglik = fm.example_log_likelihood(model, data.collate(data.examples[start:start + size])).mean()
        for key, g in zip(weights, torch.autograd.grad(loglik, list(weights.values()))):
            total[key] += g.square()
        count += 1
    return {k: v / count for k, v in total.items()}


@pytest.mark.parametrize("per_example", [True, False])
def test_fisher_equals_autograd_on_the_weights(per_example):
    model = make_tiny_llama()
    dt.attach(model, dt.FishMaskConfig(target_modules=["q_proj", "v_proj"]))
    deltas = dict(dt.adapters(model)["default"].deltas(model))
    scores = fm.fisher_scores(deltas, model, local_data(examples(6)), per_example=per_example, batch_size=3)
    expected = manual_fisher(per_example)
    for key in QV:
        torch.testing.assert_close(scores[key], expected[key], atol=1e-9, rtol=1e-4)


def test_mask_is_the_global_top_k_and_the_file_is_k_times_8_bytes(tmp_path):
    model = fitted(keep=0.02)
    config = dt.adapter_configs(model)["default"]
    deltas = dict(dt.adapters(model)["default"].deltas(model))
    total = sum(d.shape[0] * d.shape[1] for d in deltas.values())
    k = round(0.02 * total)
    assert sum(config.kept.values()) == k and len(set(config.kept.values())) > 1  # global, not per layer
    scores = fm.fisher_scores(deltas, model, local_data(examples(6)), per_example=True)
    threshold = torch.cat([s.flatten() for s in scores.values()]).topk(k).values.min()
    for path, delta in deltas.items():
        chosen = scores[path].flatten()[delta.fish_indices.long()]
        assert (chosen >= threshold).all() and delta.fish_indices.dtype == torch.int32
    sparse, dense = fm.file_bytes(model, "default")
    assert sparse == 8 * k and dense == 4 * total
    dt.save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size <= 8 * k + 4096  # k·(4+4) plus the safetensors header (names, shapes, metadata)
    print(f"FishMask file {size} B for k={k} ({sparse} B of tensors) vs {dense} B dense")


def test_forward_merge_and_file_round_trip(tmp_path, input_ids):
    model = fitted()
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, "default").values():
            if tensor.is_floating_point():
                tensor.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    delta = model.model.layers[0].self_attn.v_proj.deltas["default"]
    x = torch.randn(3, 64)
    dense = torch.zeros(64 * 32).index_add(0, delta.fish_indices.long(), delta.fish_values.detach()).view(32, 64)
    with torch.no_grad():
        base = model.model.layers[0].self_attn.v_proj.base_layer.weight
        torch.testing.assert_close(model.model.layers[0].self_attn.v_proj(x), x @ (base + dense).T)
    expected = no_grad_logits(model, input_ids)
    dt.save_adapter(model, tmp_path)
    loaded = dt.load_adapter(make_tiny_llama(), tmp_path)
    assert dt.adapter_configs(loaded)["default"].kept == dt.adapter_configs(model)["default"].kept
    torch.testing.assert_close(no_grad_logits(loaded, input_ids), expected, atol=0, rtol=0)
    dt.merge(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
    changed = (model.model.layers[0].self_attn.v_proj.base_layer.weight != base + 0).sum()
    assert changed <= len(delta.fish_indices)  # nothing outside the mask moved
    dt.unmerge(model)
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    assert_mixed_equals_alone(model, input_ids, ["default", "lora", None])


def test_errors_name_the_field_and_embeddings_are_refused():
    for kwargs, field in [({"keep_fraction": 0}, "keep_fraction"), ({"keep_fraction": 1.5}, "keep_fraction"),
                          ({"fisher": "sampled"}, "fisher"), ({"num_examples": 0}, "num_examples")]:
        with pytest.raises(dt.ConfigError, match=field):
            dt.FishMaskConfig(**kwargs)
    model = make_tiny_llama()
    with pytest.raises(dt.TargetNotFoundError):
        dt.attach(model, dt.FishMaskConfig(target_modules=["embed_tokens", "norm"]))
    assert not dt.adapter_configs(model)


def test_train_runs_the_fisher_pre_pass_and_only_the_mask_trains(tmp_path):
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    from deltatune.train.loop import train

    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(8)))}
    result = train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / "run"), data=data,
                   adapter={"peft_type": "FISHMASK", "keep_fraction": 0.01, "num_examples": 4}, max_steps=3,
                   batch_size=2, precision="fp32", optim={"lr": 1e-2})
    config, tensors, _ = dt.read_adapter(result.adapter_dir)
    k = sum(config.kept.values())
    per_layer = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64  # q, k, v, o, gate, up, down (all-linear)
    assert k == round(0.01 * 2 * per_layer)
    values = [t for key, t in tensors.items() if key.endswith("fish_values")]
    assert sum(v.numel() for v in values) == k and any((v != 0).any() for v in values)


class _KillAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            raise KeyError("killed")


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_resume_from_the_middle_is_bitwise_the_uninterrupted_run(tmp_path, quantize):
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    from deltatune.train.loop import train

    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(6)))}

    def run(name, **values):
        return train(model=make_tiny_llama(), tokenizer=make_tokenizer(), output_dir=str(tmp_path / name), data=data,
                     adapter={"peft_type": "FISHMASK", "keep_fraction": 0.02, "num_examples": 4}, max_steps=6,
                     batch_size=2, save_every=2, precision="fp32", quantize=quantize, optim={"lr": 1e-2}, **values)

    full = run("full")
    with pytest.raises(KeyError):
        run("cut", hooks=[_KillAt(5)])
    resumed = run("cut", resume=True)  # the pre-pass chooses the same mask again, then the checkpoint loads over it
    assert resumed.losses == {s: full.losses[s] for s in (5, 6)}
    (ca, a, _), (cb, b, _) = dt.read_adapter(resumed.adapter_dir), dt.read_adapter(full.adapter_dir)
    assert ca == cb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sequence_classifier_uses_log_p_of_the_class_and_its_head_trains_dense():
    """The MiniLM task's shape on a tiny random BERT: class labels (B,), a modules_to_save head."""
    import contextlib

    import transformers

    from deltatune.train.prepass import PrepassData

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_labels=3)).eval()
    dt.attach(model, dt.FishMaskConfig(keep_fraction=0.01, num_examples=6, modules_to_save=["classifier"]))
    rows = [(torch.randint(0, 100, (7,)), i % 3) for i in range(6)]

    def collate(batch):
        return {"input_ids": torch.stack([r[0] for r in batch]), "labels": torch.tensor([r[1] for r in batch])}

    data = PrepassData(rows, collate, contextlib.nullcontext, lambda t: t)
    fm.fisher_prepass(model, dt.adapter_configs(model)["default"], "default", data)
    batch = collate(rows)
    expected = torch.log_softmax(model(input_ids=batch["input_ids"]).logits, -1)[torch.arange(6), batch["labels"]]
    torch.testing.assert_close(fm.example_log_likelihood(model, batch), expected)
    kept = dt.adapter_configs(model)["default"].kept
    assert "classifier" not in " ".join(kept) and sum(kept.values()) > 0  # the head is not ranked: it trains dense
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in names)


def test_all_linear_never_targets_another_adapters_part_and_inspect_reads_the_file(tmp_path, capsys):
    from test_cli import run

    model = make_tiny_llama()
    dt.attach(model, dt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True), "prefix")  # a part with Linears
    dt.attach(model, dt.FishMaskConfig(keep_fraction=0.01, num_examples=4), "fish")
    assert not [p for p in dt.adapters(model)["fish"].sites if "deltatune_parts" in p]
    fm.fisher_prepass(model, dt.adapter_configs(model)["fish"], "fish", local_data(examples(4)))
    dt.save_adapter(model, tmp_path / "fish", "fish")
    code, out, _ = run(["inspect", str(tmp_path / "fish")], capsys)
    assert code == 0 and "validated    yes" in out  # int32 indices are declared (integer_tensors), not refused
