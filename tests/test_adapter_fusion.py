"""AdapterFusion: the formula, V = I at the start (two equal adapters give either one alone), the file holds only
the fusion and names its adapters, loading without them and deleting one are refused, fusions over adapters on
other sites or of other methods are refused before anything changes, and the regulariser through train()."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, attach_random, make_tiny_llama, no_grad_logits
from deltatune.methods.adapter_fusion import AdapterFusionConfig, loss_term


def with_adapters(seed: int = 0, kinds=("PFEIFFER", "PFEIFFER")):
    model = make_tiny_llama()
    for i, kind in enumerate(kinds):
        torch.manual_seed(seed + i)
        config = dt.PfeifferConfig() if kind == "PFEIFFER" else dt.BottleneckConfig(target_modules=["mlp"])
        dt.attach(model, config, f"task{i}")
        with torch.no_grad():
            for tensor in dt.adapter_tensors(model, f"task{i}").values():
                tensor.normal_(0, 0.3, generator=torch.Generator().manual_seed(10 + seed + i))
    return model


def fuse(model, name="fusion", names=("task0", "task1")):
    torch.manual_seed(5)
    return dt.attach(model, AdapterFusionConfig(adapters=names), name)


def test_output_is_h_plus_softmax_weighted_values():
    model = fuse(with_adapters())
    site = model.model.layers[0].mlp
    fusion = site.deltas["fusion"]
    with torch.no_grad():
        for layer in (fusion.query, fusion.key, fusion.value):
            layer.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = site.base_layer(x)
        u = torch.stack([site.deltas[n](x, h, None) - h for n in ("task0", "task1")], dim=-2)
        q, k, v = fusion.query(h), fusion.key(u), u @ fusion.value.weight.T
        s = torch.softmax((q.unsqueeze(-2) * k).sum(-1), dim=-1)
        expected = h + (s.unsqueeze(-1) * v).sum(-2)
        torch.testing.assert_close(site(x), expected, atol=1e-5, rtol=1e-5)
    assert sorted(dt.active_adapters(model)) == ["fusion"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(t) for t in dt.adapter_tensors(model, "fusion").values()}  # the adapters stay frozen


def test_two_equal_adapters_fused_at_the_start_equal_either_alone(input_ids):
    model = with_adapters()
    with torch.no_grad():  # task1 := task0
        for key, tensor in dt.adapter_tensors(model, "task1").items():
            tensor.copy_(dt.adapter_tensors(model, "task0")[key.replace("task1", "task0")])
    dt.set_active(model, "task0")
    alone = no_grad_logits(model, input_ids)
    fuse(model)
    torch.testing.assert_close(no_grad_logits(model, input_ids), alone, atol=1e-4, rtol=1e-4)  # V = I (+1e-6)


def test_file_holds_only_the_fusion_and_loading_needs_its_adapters(tmp_path, input_ids):
    model = fuse(with_adapters())
    expected = no_grad_logits(model, input_ids)
    for name in ("task0", "task1", "fusion"):
        dt.save_adapter(model, tmp_path / name, name)
    _, tensors, _ = dt.read_adapter(tmp_path / "fusion")
    assert {k.rsplit(".", 2)[-2] for k in tensors} == {"query", "key", "value"}
    assert dt.read_adapter(tmp_path / "fusion")[0].adapters == ("task0", "task1")
    fresh = make_tiny_llama()
    with pytest.raises(dt.AdapterFileError, match="depends on other adapters"):
        dt.load_adapter(fresh, tmp_path / "fusion", "fusion")
    assert not dt.adapter_configs(fresh)
    for name in ("task0", "task1"):
        dt.load_adapter(fresh, tmp_path / name, name)
    dt.load_adapter(fresh, tmp_path / "fusion", "fusion")
    torch.testing.assert_close(no_grad_logits(fresh, input_ids), expected, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="depends on other adapters"):
        dt.delete_adapter(fresh, "task1")
    assert set(dt.adapter_configs(fresh)) == {"task0", "task1", "fusion"}
    dt.delete_adapter(fresh, "fusion")
    dt.delete_adapter(fresh, "task1")  # once the fusion is gone


def test_refused_fusions_change_nothing():
    model = with_adapters(kinds=("PFEIFFER", "BOTTLENECK"))  # mlp only vs mlp: same site, fine
    attach_random(model, "lora", 1)
    dt.attach(model, dt.BottleneckConfig(), "houlsby")  # self_attn and mlp
    before = dict(dt.adapter_configs(model))
    with pytest.raises(dt.ConfigError, match="different sites"):
        fuse(model, names=("task0", "houlsby"))
    with pytest.raises(dt.ConfigError, match="not a bottleneck adapter"):
        fuse(model, names=("task0", "lora"))
    with pytest.raises(dt.ConfigError, match="at least two"):
        AdapterFusionConfig(adapters=("task0",))
    assert dt.adapter_configs(model) == before
    fuse(model, names=("task0", "task1"))  # a Pfeiffer and a Houlsby-on-mlp adapter: same site and width


def test_mixed_batch_fusion_rows_and_adapter_rows(input_ids):
    model = fuse(with_adapters())
    with torch.no_grad():
        dt.adapter_tensors(model, "fusion")["base_model.model.model.layers.0.mlp.query.weight"].normal_(0, 0.3)
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(2))
    assert_mixed_equals_alone(model, ids, ["fusion", "task0", None])


def test_regulariser_is_the_formula_and_trains_through_train(tmp_path):
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    from deltatune.train.loop import train

    model = fuse(with_adapters())
    config = dt.adapter_configs(model)["fusion"]
    with torch.no_grad():
        for _, delta in dt.adapters(model)["fusion"].deltas(model):
            delta.value.weight.add_(0.1)
    expected = sum(((torch.eye(64) - d.value.weight) ** 2).sum() for _, d in dt.adapters(model)["fusion"].deltas(model))
    torch.testing.assert_close(loss_term(model, config, "fusion"), 0.01 * expected)

    model = with_adapters()
    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(6)))}
    result = train(model=model, tokenizer=make_tokenizer(), output_dir=str(tmp_path / "run"), data=data,
                   adapter={"peft_type": "ADAPTER_FUSION", "adapters": ["task0", "task1"]}, max_steps=3,
                   batch_size=2, precision="fp32", optim={"lr": 1e-2})
    logged = [line for line in result.metrics_path.read_text().splitlines() if "aux_loss" in line]
    assert logged  # the regulariser is logged apart from the task loss
    _, tensors, _ = dt.read_adapter(result.adapter_dir)
    assert all(k.rsplit(".", 2)[-2] in ("query", "key", "value") for k in tensors)
