"""The adapter file format against the real peft package, both ways, and every way a file can be bad."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from conftest import make_tiny_llama, assert_unchanged, capture_state

peft = pytest.importorskip("peft")


def _tiny_llama_untied(seed: int = 0):
    model = make_tiny_llama(seed)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _seq_cls(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    config._name_or_path = "tiny-llama-cls"
    return LlamaForSequenceClassification(config).eval()


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    config._name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


# (id, base model factory, LoraConfig kwargs shared verbatim by deltatune and peft)
CASES = [
    ("plain", make_tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("rslora-all-linear", make_tiny_llama,
     {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"}),
    ("rank-alpha-pattern", make_tiny_llama, {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        "rank_pattern": {"q_proj": 2, "k_proj|o_proj": 6, "model.layers.1.mlp.down_proj": 3},
        "alpha_pattern": {"v_proj": 32, "down_proj": 2}}),
    ("layers", make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1],
                                 "layers_pattern": "layers"}),
    ("seq-cls-modules-to-save", _seq_cls, {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS",
                                           "modules_to_save": ["score"]}),
    ("embedding", _tiny_llama_untied, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    ("gpt2-conv1d-bias", _gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "bias": "lora_only"}),
    ("gpt2-bias-all", _gpt2, {"r": 4, "target_modules": ["c_attn", "c_fc"], "bias": "all"}),
]


def _ids(model) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(1, vocab, (3, 9), generator=torch.Generator().manual_seed(7))  # no pad token (id 0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _perturb_full_copies(model) -> None:
    """Make trained-in-full copies and learnable biases differ from the base, so the file must carry them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name or (param.requires_grad and name.endswith("bias")):
                param.add_(torch.randn_like(param) * 0.1)


def _dt_adapter(make_model, kwargs, directory: Path):
    """A deltatune adapter with random A and B (init_lora_weights=False), saved to `directory`."""
    model = make_model()
    torch.manual_seed(1)
    dt.attach(model, dt.LoraConfig(init_lora_weights=False, **kwargs))
    _perturb_full_copies(model)
    dt.save_adapter(model, directory)
    return model


def _peft_adapter(make_model, kwargs, directory: Path):
    kwargs = dict(kwargs)
    if kwargs.get("task_type") == "SEQ_CLS":
        kwargs.pop("modules_to_save")  # peft adds its classifier head names itself
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make_model(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    _perturb_full_copies(model)
    # peft's default "auto" looks the base up on the Hub unless an embedding is targeted; keep unit tests offline
    embedding = "embed_tokens" in kwargs["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory), save_embedding_layers="auto" if embedding else False)
    return model


def _peft_load(make_model, directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make_model(), str(directory)).eval()


def _safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ---- (a) deltatune -> peft, (b) peft -> deltatune ---------------------------------------------------

@pytest.mark.parametrize(("make_model", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_deltatune_file_loads_in_peft(tmp_path, make_model, kwargs):
    model = _dt_adapter(make_model, kwargs, tmp_path)
    ids = _ids(model)
    expected = _logits(model, ids)
    with dt.disable_adapters(model):
        assert not torch.allclose(_logits(model, ids), expected, atol=1e-4)  # the adapter is not a no-op
    torch.testing.assert_close(_logits(_peft_load(make_model, tmp_path), ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("make_model", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_peft_file_loads_in_deltatune(tmp_path, make_model, kwargs):
    peft_model = _peft_adapter(make_model, kwargs, tmp_path)
    ids = _ids(make_model())
    expected = _logits(peft_model, ids)
    model = dt.load_adapter(make_model(), tmp_path)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    with dt.disable_adapters(model):
        assert not torch.allclose(_logits(model, ids), expected, atol=1e-4)


def test_peft_embedding_file_carries_base_weights_and_both_load_them(tmp_path):
    # peft saves a targeted embedding's own weight (save_embedding_layers="auto") and loads it into the base
    kwargs = {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}
    peft_model = _peft_adapter(_tiny_llama_untied, kwargs, tmp_path / "before")
    with torch.no_grad():
        peft_model.base_model.model.model.embed_tokens.base_layer.weight.add_(0.5)  # e.g. trained new tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "after"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in _safetensors_keys(tmp_path / "after")
    ids = _ids(peft_model)
    expected = _logits(_peft_load(_tiny_llama_untied, tmp_path / "after"), ids)
    torch.testing.assert_close(_logits(peft_model, ids), expected, atol=1e-5, rtol=1e-5)
    model = dt.load_adapter(_tiny_llama_untied(), tmp_path / "after")
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)


# ---- (c) what is on disk ------------------------------------------------------------------------------

def _normalised(record: dict) -> dict:
    out = dict(record)
    for key in ("target_modules", "modules_to_save"):
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    return out


@pytest.mark.parametrize("case", ["plain", "rank-alpha-pattern", "layers", "gpt2-conv1d-bias", "gpt2-bias-all"])
def test_config_file_has_peft_keys_and_values(tmp_path, case):
    _, make_model, kwargs = next(c for c in CASES if c[0] == case)
    kwargs = {"task_type": "CAUSAL_LM", **kwargs}  # deltatune writes it for a causal LM unasked; peft when told
    _dt_adapter(make_model, kwargs, tmp_path / "dt")
    _peft_adapter(make_model, kwargs, tmp_path / "peft")
    ours = json.loads((tmp_path / "dt" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    reference = peft.LoraConfig(init_lora_weights=False, **kwargs).to_dict()
    peft_config = {k: v.value if hasattr(v, "value") else v for k, v in reference.items()}  # enums to strings
    peft_config["target_modules"] = sorted(peft_config["target_modules"])
    assert set(ours) == set(peft_config) == set(theirs)
    filled_on_save = {"base_model_name_or_path", "inference_mode", "auto_mapping"}
    ours, theirs = _normalised(ours), _normalised(theirs)
    assert {k: (ours[k], v) for k, v in peft_config.items() if k not in filled_on_save and ours[k] != v} == {}
    # peft flips fan_in_fan_out to True in the config it writes for Conv1D targets; both readers ignore it there
    flipped = {"fan_in_fan_out"} if make_model is _gpt2 else set()
    assert {k: (ours[k], theirs[k]) for k in set(ours) - flipped if ours[k] != theirs[k]} == {}
    assert _safetensors_keys(tmp_path / "dt") == _safetensors_keys(tmp_path / "peft")


def test_tensor_keys_and_metadata(tmp_path):
    _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path)
    expected = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}
    assert _safetensors_keys(tmp_path) == expected
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 64)
    assert metadata["deltatune_version"] == dt.__version__
    assert metadata["format"] == "pt"
    record = json.loads((tmp_path / "adapter_config.json").read_text())
    assert record["peft_type"] == "LORA" and record["base_model_name_or_path"] == "tiny-llama"
    assert record["inference_mode"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_read_adapter_does_not_touch_a_model(tmp_path):
    _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj"]}, tmp_path)
    config, tensors, metadata = dt.read_adapter(tmp_path)
    assert isinstance(config, dt.LoraConfig) and config.r == 4 and config.target_modules == ("q_proj",)
    assert len(tensors) == 4 and metadata["deltatune_version"] == dt.__version__


# ---- (d) bad input --------------------------------------------------------------------------------

def _edit_config(path: Path, **changes) -> None:
    record = json.loads((path / "adapter_config.json").read_text())
    record.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(record))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

BAD_INPUTS = {
    "missing-dir": (lambda p: None, "does-not-exist", "not a directory"),
    "missing-config": (lambda p: (p / "adapter_config.json").unlink(), "", "no adapter_config.json"),
    "invalid-json": (lambda p: (p / "adapter_config.json").write_text('{"r": 4,'), "", "not valid JSON"),
    "not-an-object": (lambda p: (p / "adapter_config.json").write_text("[1, 2]"), "", "JSON object"),
    "no-peft-type": (lambda p: (p / "adapter_config.json").write_text('{"r": 4}'), "", "peft_type"),
    "unknown-method": (lambda p: _edit_config(p, peft_type="NOPE"), "", "unknown method 'NOPE'"),
    "unknown-key": (lambda p: _edit_config(p, lora_rank=4), "", "lora_rank"),
    "r-zero": (lambda p: _edit_config(p, r=0), "", r"\br must be a positive integer, got 0"),
    "dropout-one": (lambda p: _edit_config(p, lora_dropout=1.0), "", "lora_dropout"),
    "use-dora-no-magnitude": (lambda p: _edit_config(p, use_dora=True), "", r"missing 4 tensors.*lora_magnitude_vector"),
    "target-not-in-model": (lambda p: _edit_config(p, target_modules=["c_attn"]), "", "c_attn"),
    "missing-weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "", "no adapter_model.safetensors"),
    "truncated-weights": (
        lambda p: (p / "adapter_model.safetensors").write_bytes(
            (p / "adapter_model.safetensors").read_bytes()[: (p / "adapter_model.safetensors").stat().st_size // 2]),
        "", "truncated or corrupted"),
    "wrong-shape": (lambda p: _edit_tensors(p, lambda t: t.__setitem__(KEY, torch.zeros(4, 63))), "",
                    rf"{KEY}.*\(4, 63\).*\(4, 64\)"),
    "missing-tensor": (lambda p: _edit_tensors(p, lambda t: t.pop(KEY)), "", rf"missing 1 tensors.*{KEY}"),
    "unexpected-tensor": (
        lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.model.nope.lora_A.weight",
                                                            torch.zeros(1))),
        "", "fit no module.*nope"),
}


@pytest.mark.parametrize("with_existing", [False, True], ids=["fresh-base", "existing-adapter"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_adapter_is_refused_and_changes_nothing(tmp_path, case, with_existing):
    break_it, subdir, message = BAD_INPUTS[case]
    _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path)
    break_it(tmp_path)
    model = make_tiny_llama()
    if with_existing:
        torch.manual_seed(3)
        dt.attach(model, dt.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), "first")
    snapshot = capture_state(model)
    with pytest.raises(dt.AdapterFileError, match=message):
        dt.load_adapter(model, tmp_path / subdir, "second")
    assert_unchanged(model, snapshot)


def test_bad_adapter_with_modules_to_save_changes_nothing(tmp_path):
    kwargs = {"r": 4, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"]}
    _dt_adapter(_seq_cls, kwargs, tmp_path)
    _edit_tensors(tmp_path, lambda t: t.__setitem__("base_model.model.score.weight", torch.zeros(2, 64)))
    model = _seq_cls()
    snapshot = capture_state(model)
    with pytest.raises(dt.AdapterFileError, match=r"score\.weight.*\(2, 64\).*\(3, 64\)"):
        dt.load_adapter(model, tmp_path)
    assert_unchanged(model, snapshot)


def _narrow_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._name_or_path = "other-llama"
    return LlamaForCausalLM(config).eval()


def test_adapter_for_another_base_is_refused(tmp_path):
    _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path)  # hidden 64
    model = _narrow_llama()  # hidden 32
    snapshot = capture_state(model)
    with pytest.raises(dt.AdapterFileError, match="trained for base model 'tiny-llama'.*'other-llama'") as info:
        dt.load_adapter(model, tmp_path)
    assert "shape" in str(info.value)
    assert_unchanged(model, snapshot)


def test_pickle_weights_need_allow_pickle(tmp_path):
    original = _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "adapter_model.bin")
    weights.unlink()
    model = make_tiny_llama()
    snapshot = capture_state(model)
    with pytest.raises(dt.AdapterFileError, match="allow_pickle=True"):
        dt.load_adapter(model, tmp_path)
    assert_unchanged(model, snapshot)
    dt.load_adapter(model, tmp_path, allow_pickle=True)
    ids = _ids(model)
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), atol=1e-6, rtol=1e-6)


# ---- (e) round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize(("make_model", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_save_load_round_trip(tmp_path, make_model, kwargs):
    model = _dt_adapter(make_model, kwargs, tmp_path)
    ids = _ids(model)
    loaded = dt.load_adapter(make_model(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-6, rtol=1e-6)
    for key, tensor in dt.adapter_tensors(model, "default").items():
        assert torch.equal(dt.adapter_tensors(loaded, "default")[key], tensor), key
    restored = dt.adapter_configs(loaded)["default"]
    assert restored.inference_mode and restored.base_model_name_or_path == model.config._name_or_path
    filled = {"task_type": dt.adapter_configs(model)["default"].task_type}  # CAUSAL_LM written for a causal LM
    assert restored.replace(inference_mode=False, base_model_name_or_path=None, **filled) == dt.adapter_configs(model)["default"]


def test_loaded_adapters_are_frozen_unless_trainable(tmp_path):
    _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path)
    frozen = dt.load_adapter(make_tiny_llama(), tmp_path)
    assert dt.trainable_parameters(frozen)[0] == 0
    trainable = dt.load_adapter(make_tiny_llama(), tmp_path, trainable=True)
    expected = {id(p) for p in dt.adapter_tensors(trainable, "default").values()}
    assert {id(p) for p in trainable.parameters() if p.requires_grad} == expected
    assert dt.trainable_parameters(trainable)[0] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)  # 2 layers × (q, v)


def test_several_adapters_load_side_by_side_and_save_by_name(tmp_path):
    first = _dt_adapter(make_tiny_llama, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, tmp_path / "a")
    torch.manual_seed(5)
    second = make_tiny_llama()
    dt.attach(second, dt.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    dt.save_adapter(second, tmp_path / "b")
    model = make_tiny_llama()
    dt.load_adapter(model, tmp_path / "a", "a")
    dt.load_adapter(model, tmp_path / "b", "b", activate=False)
    assert dt.active_adapters(model) == ["a"]
    ids = _ids(model)
    with dt.route(model, ["b", "a", None]):
        mixed = _logits(model, ids)
    torch.testing.assert_close(mixed[0], _logits(second, ids[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], _logits(first, ids[1:2])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], _logits(make_tiny_llama(), ids[2:])[0], atol=1e-5, rtol=1e-5)
    dt.save_adapter(model, tmp_path / "b2", name="b")
    assert load_file(str(tmp_path / "b2" / "adapter_model.safetensors")).keys() == \
        load_file(str(tmp_path / "b" / "adapter_model.safetensors")).keys()
    with pytest.raises(KeyError, match="'zz'"):
        dt.save_adapter(model, tmp_path / "zz", name="zz")


def test_pickle_holding_something_other_than_tensors_is_refused(tmp_path):
    model = dt.attach(make_tiny_llama(), dt.LoraConfig(r=4))
    dt.save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    with pytest.raises(dt.AdapterFileError, match="not a mapping of tensor names"):
        dt.load_adapter(make_tiny_llama(), tmp_path, allow_pickle=True)


def test_task_type_and_base_as_peft_writes_them(tmp_path, monkeypatch):
    """A causal LM's file says CAUSAL_LM unasked (peft's AutoPeftModelForCausalLM and PeftModel build
    PeftModelForCausalLM from it); a bare encoder's says none and carries auto_mapping; the embedded model's
    cache directory is written as its hub id, with the exact source in the metadata."""
    from deltatune import models
    from deltatune.core.io import _other_base_hint, base_source, read_adapter

    dt.save_adapter(dt.attach(make_tiny_llama(), dt.LoraConfig(r=2)), tmp_path / "causal")
    record = json.loads((tmp_path / "causal" / "adapter_config.json").read_text())
    assert record["task_type"] == "CAUSAL_LM" and record["auto_mapping"] is None
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "causal")
    assert type(theirs).__name__ == "PeftModelForCausalLM"

    from transformers import BertConfig, BertModel
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64))
    dt.save_adapter(dt.attach(encoder, dt.LoraConfig(r=2, target_modules=["query", "value"])), tmp_path / "encoder")
    record = json.loads((tmp_path / "encoder" / "adapter_config.json").read_text())
    assert record["task_type"] is None and record["auto_mapping"]["base_model_class"] == "BertModel"

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    embedded = tmp_path / "cache" / "models" / f"{models.DEFAULT_MODEL}-tf0-abc"
    embedded.mkdir(parents=True)
    source = {"hub_id": models.HUB_ID, "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": "0" * 64}
    (embedded / "deltatune-complete.json").write_text(json.dumps({"fingerprint": {}, "source_info": source}))
    model = make_tiny_llama()
    model.config._name_or_path = str(embedded)
    dt.save_adapter(dt.attach(model, dt.LoraConfig(r=2)), tmp_path / "embedded")
    config, _, metadata = read_adapter(tmp_path / "embedded")
    assert config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_source(metadata) == source
    legacy = make_tiny_llama()  # files of older versions recorded the old cache path: the same base, no warning
    legacy.config._name_or_path = str(tmp_path / "cache" / "models" / models.DEFAULT_MODEL)
    assert _other_base_hint(legacy, config.base_model_name_or_path) == ""
