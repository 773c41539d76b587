"""One conformance suite, run for every registered method (peft's tester idea, on the tiny Llama).

Every method in `dt.registered_methods()` must have at least one case in CASES; a method without one fails
`test_every_registered_method_has_a_case`, so a new method cannot skip the suite. Each case checks:
identity at initialisation, only adapter parameters trainable, merged == unmerged and unmerge restores the
weights (if the method merges), save/load round trip, mixed batch == separate runs, and the loss falls.

The training axis: every method with a training-side part (a step hook, a loss term, an lr factor or a run-fitted
schedule: AdaLoRA, ReLoRA, DyLoRA, ...) runs a few steps through `train()` with checkpoints, is killed and
resumed from the middle, and must end bitwise equal to the run never interrupted, on a 16-bit and an NF4 base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import deltatune as dt
from conftest import assert_mixed_equals_alone, make_tiny_llama


@dataclass(frozen=True)
class Case:
    name: str
    make_config: Callable[[], dt.AdapterConfig]
    identity_at_init: bool = True  # the adapted model equals the base before training
    mergeable: bool = True  # the method's layers can fold into the base weight
    mixable: bool = True  # rows can use it in a mixed batch (not for parameters trained in place: BitFit, FULL)
    max_trainable_fraction: float = 0.2  # of the model's parameters (FULL trains all of them)
    saves_as: str | None = None  # the peft_type of the file when a save-only view writes another method's (ReLoRA)
    prepare: Callable | None = None  # what a fresh model needs first (AdapterFusion: the adapters it fuses)


CASES: dict[str, list[Case]] = {
    "LORA": [
        Case("plain", lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        Case("rslora-gaussian", lambda: dt.LoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights="gaussian",
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
        Case("all-linear-rank-pattern", lambda: dt.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 2, "q_proj|k_proj": 6},
            alpha_pattern={"o_proj": 16})),
        Case("dora-all-linear", lambda: dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")),
        Case("dora-rslora-qv", lambda: dt.LoraConfig(r=8, lora_alpha=16, use_dora=True, use_rslora=True,
                                                     target_modules=["q_proj", "v_proj"])),
        # initialisations (methods/lora_init.py): PiSSA/OLoRA keep W and the initial factors; LoftQ quantizes the
        # base itself (so no second adapter, no in-place merge, and not the base's function at start)
        Case("pissa-all-linear", lambda: dt.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear",
                                                       init_lora_weights="pissa")),
        Case("olora-niter-qv", lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="olora")),
        Case("loftq-all-linear", lambda: dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights="loftq",
                                                       loftq_config={"loftq_bits": 4, "loftq_iter": 2}),
             identity_at_init=False, mergeable=False, mixable=False, max_trainable_fraction=0.5),  # W is now buffers
        Case("eva-qv", lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")),
        Case("qpissa-niter-all-linear", lambda: dt.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear",
                                                              init_lora_weights="pissa_niter_2",
                                                              loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
             identity_at_init=False, mergeable=False, mixable=False, max_trainable_fraction=0.5),
    ],
    # output vectors on k/v, an input vector on down_proj (peft's Llama defaults); a regex with an input vector
    "IA3": [
        Case("llama-defaults", lambda: dt.IA3Config()),
        Case("regex-feedforward", lambda: dt.IA3Config(target_modules=r".*\.(q_proj|o_proj|up_proj)",
                                                       feedforward_modules=r".*\.(o_proj|up_proj)")),
    ],
    # virtual tokens change the output from the start; nothing to fold into a weight
    "PROMPT_TUNING": [
        Case("sample-vocab", lambda: dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
             identity_at_init=False, mergeable=False),
    ],
    # keys and values before every layer's cache (GQA layout), directly or through the projection MLP
    "PREFIX_TUNING": [
        Case("direct", lambda: dt.PrefixTuningConfig(num_virtual_tokens=3), identity_at_init=False, mergeable=False),
        Case("projection", lambda: dt.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True,
                                                         encoder_hidden_size=16), identity_at_init=False, mergeable=False),
    ],
    # virtual tokens made by peft's prompt encoder (MLP, LSTM); the file holds the encoder's output
    "P_TUNING": [
        Case("mlp", lambda: dt.PromptEncoderConfig(num_virtual_tokens=3), identity_at_init=False, mergeable=False),
        Case("lstm", lambda: dt.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="LSTM",
                                                    encoder_hidden_size=8), identity_at_init=False, mergeable=False),
    ],
    # a sparse delta on k chosen weights per Linear (`kept` as a file records it; values 0 at start)
    "FISHMASK": [
        Case("kept-qv", lambda: dt.FishMaskConfig(target_modules=["q_proj", "v_proj"], kept={
            f"model.layers.{i}.self_attn.{m}": 8 for i in range(2) for m in ("q_proj", "v_proj")})),
    ],
    # Child-tuning_F: full fine-tuning under Bernoulli gradient masks (a step hook); _D: FishMask's sparse form
    "CHILD_TUNING_F": [
        # the norms train on an NF4 base too (its 4-bit Linears hold no parameters to train in place)
        Case("mlp-norms-p03", lambda: dt.ChildTuningConfig(target_modules=["mlp", "post_attention_layernorm"]),
             mixable=False, max_trainable_fraction=0.6),
    ],
    "CHILD_TUNING_D": [
        Case("kept-qv", lambda: dt.ChildTuningDConfig(target_modules=["q_proj", "v_proj"], kept={
            f"model.layers.{i}.self_attn.{m}": 8 for i in range(2) for m in ("q_proj", "v_proj")})),
    ],
    # attention over two frozen Pfeiffer adapters (attached first by `prepare`); V = I, so not the base at start
    "ADAPTER_FUSION": [
        Case("two-pfeiffer", lambda: dt.AdapterFusionConfig(adapters=("task0", "task1")), identity_at_init=False,
             mergeable=False, max_trainable_fraction=0.25, prepare=lambda model: _two_pfeiffer_adapters(model)),
    ],
    # serial adapters after self_attn and mlp: near identity (Houlsby init) or exactly (zero up-projection)
    "BOTTLENECK": [
        Case("houlsby-llama-defaults", lambda: dt.BottleneckConfig(), identity_at_init=False, mergeable=False),
        Case("zero-up-relu-mlp", lambda: dt.BottleneckConfig(target_modules=["mlp"], reduction_factor=4,
                                                             activation="relu", init_weights="zero_up"), mergeable=False),
    ],
    "PFEIFFER": [
        Case("after-mlp-defaults", lambda: dt.PfeifferConfig(), identity_at_init=False, mergeable=False),
    ],
    # beside the block, reading its input: W_up = 0 (mam init) is exactly the base; Houlsby init near it
    "PARALLEL_ADAPTER": [
        Case("mam-mlp", lambda: dt.ParallelAdapterConfig(), mergeable=False),
        Case("houlsby-attn-mlp", lambda: dt.ParallelAdapterConfig(target_modules=["self_attn", "mlp"], scaling=1.0,
                                                                  init_weights="houlsby"),
             identity_at_init=False, mergeable=False),
    ],
    # the tiny Llama has no biases: added zero biases (weight deltas, mergeable, mixable)
    "BITFIT": [
        Case("added-biases-all", lambda: dt.BitFitConfig(add_biases=True)),
        Case("added-biases-qv", lambda: dt.BitFitConfig(add_biases=True, target_modules=["q_proj", "v_proj"])),
    ],
    # DyLoRA at its full rank outside training; a rank chosen at load (rank=2) on all linear layers
    "DYLORA": [
        Case("frozen-qv", lambda: dt.DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        Case("rank-2-all-linear", lambda: dt.DyLoraConfig(r=4, lora_alpha=8, rank=2, frozen=False,
                                                          target_modules="all-linear")),
    ],
    # LyCORIS: a Hadamard and a Kronecker product of low-rank factors (W2b / W1 zero at start)
    "LOHA": [
        Case("qv", lambda: dt.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
        Case("all-linear-patterns", lambda: dt.LoHaConfig(r=2, alpha=4, target_modules="all-linear",
                                                          rank_pattern={"down_proj": 3}, alpha_pattern={"o_proj": 2})),
    ],
    "LOKR": [
        Case("all-linear", lambda: dt.LoKrConfig(r=2, alpha=4, target_modules="all-linear")),
        Case("decompose-both-lycoris-init", lambda: dt.LoKrConfig(r=1, decompose_both=True, init_weights="lycoris",
                                                                  target_modules=["q_proj", "v_proj", "up_proj"])),
    ],
    # SVD-form LoRA at full init_r (E = 0: identity at start); its budget hook and penalty run in the training axis
    "ADALORA": [
        Case("qv", lambda: dt.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2,
                                            target_modules=["q_proj", "v_proj"])),
    ],
    # VeRA's shared pair regenerated from its key (save_projection=False: the suite perturbs every file tensor,
    # and saved projections that no longer match their key are refused on load, by design)
    "VERA": [
        Case("qv-down", lambda: dt.VeraConfig(r=8, save_projection=False, target_modules=["q_proj", "v_proj", "down_proj"])),
        Case("all-linear-key-3", lambda: dt.VeraConfig(r=16, projection_prng_key=3, save_projection=False,
                                                       target_modules="all-linear")),
    ],
    # K = total_step / relora_steps = 3 segments: K·r = 12 below every layer's dimensions, saved as one plain LoRA;
    # r = 12 makes K·r = 36 reach v_proj's 32 outputs: the dense merged part, saved as ReLoRA's own file
    "RELORA": [
        Case("factored-saved-as-lora", lambda: dt.ReLoraConfig(r=4, lora_alpha=8, relora_steps=2, restart_warmup_steps=1,
                                                               total_step=6, target_modules=["q_proj", "v_proj"]),
             saves_as="LORA"),
        Case("dense-qv", lambda: dt.ReLoraConfig(r=12, relora_steps=2, restart_warmup_steps=1, total_step=6,
                                                 target_modules=["q_proj", "v_proj"])),
    ],
    "FULL": [
        Case("every-parameter", lambda: dt.FullConfig(), mixable=False, max_trainable_fraction=1.0),
        Case("mlp-only", lambda: dt.FullConfig(target_modules=["mlp"]), mixable=False, max_trainable_fraction=0.6),
    ],
}


def _params():
    out = []
    for peft_type in sorted(dt.registered_methods()):
        cases = CASES.get(peft_type) or [None]
        for case in cases:
            out.append(pytest.param(peft_type, case, id=f"{peft_type}-{case.name if case else 'MISSING-CASE'}"))
    return out


def _require_case(peft_type: str, case: Case | None) -> Case:
    if case is None:
        pytest.fail(f"method {peft_type!r} is registered but has no conformance case: add at least one "
                    f"Case(...) under CASES[{peft_type!r}] in tests/test_conformance.py")
    return case


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(11))


def _logits(model, ids):
    """Logits at the input tokens' positions (prompt tuning's virtual positions come first and are left out)."""
    with torch.no_grad():
        return model(ids).logits[:, -ids.shape[1]:]


def _fresh(case: Case):
    """A tiny Llama, with what the case needs attached first (the same every time)."""
    model = make_tiny_llama()
    if case.prepare is not None:
        case.prepare(model)
    return model


def _two_pfeiffer_adapters(model) -> None:
    for i in range(2):
        torch.manual_seed(100 + i)
        dt.attach(model, dt.PfeifferConfig(), f"task{i}")
        _perturb(model, f"task{i}", 100 + i)


def _attach(case: Case, name: str = "default", seed: int = 1, perturb: bool = True):
    """A tiny Llama with the case's adapter; `perturb` adds noise to every adapter tensor so it is not a no-op."""
    model = _fresh(case)
    torch.manual_seed(seed)
    config = case.make_config()
    dt.attach(model, config, name)
    if perturb:
        _perturb(model, name, seed)
    return model


def _perturb(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            if tensor.is_floating_point():  # FishMask's indices are int32
                tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.1)


def _base_state(model) -> dict[str, torch.Tensor]:
    adapter_ids = {id(t) for n in dt.adapter_configs(model) for t in dt.adapter_tensors(model, n).values()}
    return {k: p.detach().clone() for k, p in model.state_dict(keep_vars=True).items() if id(p) not in adapter_ids}


def test_every_registered_method_has_a_case():
    missing = sorted(set(dt.registered_methods()) - set(CASES))
    assert not missing, (
        f"registered methods without a conformance case: {missing}; add Case(...) entries to CASES in "
        "tests/test_conformance.py"
    )
    unknown = sorted(set(CASES) - set(dt.registered_methods()))
    assert not unknown, f"CASES names methods that are not registered: {unknown}"


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_config_matches_method(peft_type, case):
    case = _require_case(peft_type, case)
    config = case.make_config()
    assert config.peft_type == peft_type
    assert type(config).from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_identity_at_init(peft_type, case):
    case = _require_case(peft_type, case)
    ids = _ids()
    base = _logits(make_tiny_llama(), ids)
    adapted = _logits(_attach(case, perturb=False), ids)
    if case.identity_at_init:
        torch.testing.assert_close(adapted, base, atol=1e-6, rtol=1e-6)
    else:
        assert not torch.allclose(adapted, base, atol=1e-6)


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_only_adapter_parameters_are_trainable(peft_type, case):
    case = _require_case(peft_type, case)
    model = _attach(case, perturb=False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    # an adapter's persistent buffers (P-tuning's offset, ReLoRA's merged segments) are saved and loaded, never trained
    adapter = {id(t) for t in dt.adapter_tensors(model, "default").values() if isinstance(t, torch.nn.Parameter)}
    assert trainable and trainable == adapter
    count, total = dt.trainable_parameters(model)
    assert 0 < count <= total * case.max_trainable_fraction


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_merge_equals_unmerged_and_unmerge_restores(peft_type, case):
    case = _require_case(peft_type, case)
    if not case.mergeable:
        pytest.skip(f"{peft_type} {case.name} declares mergeable=False")
    model = _attach(case)
    ids = _ids()
    weights = _base_state(model)
    unmerged = _logits(model, ids)
    dt.merge(model)
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    merged_weights = _base_state(model)
    dt.merge(model)  # idempotent
    assert all(torch.equal(v, merged_weights[k]) for k, v in _base_state(model).items())
    dt.unmerge(model)
    for key, value in _base_state(model).items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_save_load_round_trip(peft_type, case, tmp_path):
    case = _require_case(peft_type, case)
    model = _attach(case)
    ids = _ids()
    dt.save_adapter(model, tmp_path)
    loaded = dt.load_adapter(_fresh(case), tmp_path)
    assert dt.adapter_configs(loaded)["default"].peft_type == (case.saves_as or peft_type)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_mixed_batch_equals_separate_runs(peft_type, case):
    case = _require_case(peft_type, case)
    if not case.mixable:
        pytest.skip(f"{peft_type} {case.name} declares mixable=False")
    model = _attach(case, "a", seed=1)
    torch.manual_seed(2)
    dt.attach(model, case.make_config(), "b")
    _perturb(model, "b", seed=2)
    ids = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(3))
    assert_mixed_equals_alone(model, ids, ["b", None, "a", "b"])


@pytest.mark.parametrize(("peft_type", "case"), _params())
def test_loss_falls(peft_type, case):
    case = _require_case(peft_type, case)
    model = _attach(case, perturb=False)
    model.train()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(ids, labels=ids).loss.item())
    assert losses[-1] < losses[0], losses


# ---- the training axis: methods with a hook, a loss term or a schedule ----------------------------------------
def _trains(peft_type: str) -> bool:
    method = dt.registered_methods()[peft_type]
    return any(getattr(method, part, None) is not None for part in ("step_hook", "loss_term", "lr_factor", "fit_run"))


def _training_params():
    return [p for p in _params() if _trains(p.values[0]) and p.values[1] is not None]


def _train_section(config) -> dict:
    """The config as a TrainConfig adapter section: its non-default fields; total_step comes from max_steps."""
    import dataclasses

    default = None  # the fields' declared defaults (a default instance may not validate: AdapterFusion's adapters)
    out = {"peft_type": config.peft_type}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "total_step" or value == (getattr(default, f.name) if default else f.default):
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


class _KillAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, model, optimizer, step):
        if step == self.step:
            raise KeyError("killed")


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize(("peft_type", "case"), _training_params())
def test_train_checkpoint_and_resume_from_the_middle_bitwise(peft_type, case, quantize, tmp_path):
    from deltatune.train.loop import train
    from test_train_loop import make_tokenizer, prompt_completion, write_jsonl

    if quantize and case.prepare is not None:
        pytest.skip("its adapters are attached before train(), which quantizes only a model without adapters")
    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", prompt_completion(6)))}

    def run(name, **values):
        return train(model=_fresh(case), tokenizer=make_tokenizer(), output_dir=str(tmp_path / name), data=data,
                     adapter=_train_section(case.make_config()), max_steps=6, batch_size=2, save_every=2,
                     precision="fp32", quantize=quantize, optim={"lr": 1e-2}, **values)

    full = run("full")
    with pytest.raises(KeyError):
        run("cut", hooks=[_KillAt(5)])  # the newest checkpoint is step 4
    resumed = run("cut", resume=True)
    assert resumed.losses == {s: full.losses[s] for s in (5, 6)}
    (ca, a, _), (cb, b, _) = dt.read_adapter(resumed.adapter_dir), dt.read_adapter(full.adapter_dir)
    assert ca == cb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
