"""Combining adapters (deltatune.compose): peft's add_weighted_adapter types against peft, known answers, refusals."""
import math

import pytest
import torch

import deltatune as dt
from deltatune.compose import CombineError, combine_adapters
from deltatune.compose import merge_ops

from conftest import assert_unchanged, capture_state, make_tiny_llama, no_grad_logits

peft = pytest.importorskip("peft")
from peft.utils import merge_utils  # noqa: E402

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
# three LoRAs of rank 4 with different scales; "b" adapts k_proj where the others adapt q_proj (zero blocks)
SPECS = {"a": dict(target_modules=["q_proj", "v_proj"], lora_alpha=8),
         "b": dict(target_modules=["k_proj", "v_proj"], lora_alpha=16),
         "c": dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=4)}
W = [0.7, 0.5, 0.3]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    dirs = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        model = make_tiny_llama()
        torch.manual_seed(10 + i)
        dt.attach(model, dt.LoraConfig(r=4, init_lora_weights=False, **spec), name)
        dirs[name] = dt.save_adapter(model, root / name, name)
    return dirs


def _ours(saved, names=("a", "b", "c")):
    model = make_tiny_llama()
    for n in names:
        dt.load_adapter(model, saved[n], n)
    return model


def _peft_logits(saved, kind, weights=W, names=("a", "b", "c"), **kwargs):
    model = peft.PeftModel.from_pretrained(make_tiny_llama(), str(saved[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(saved[n]), adapter_name=n)
    model.add_weighted_adapter(list(names), list(weights), "mix", combination_type=kind, **kwargs)
    model.set_adapter("mix")
    return no_grad_logits(model.eval(), IDS)


@pytest.mark.parametrize("kind,kwargs", [
    ("cat", {}), ("linear", {}), ("svd", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune", {"density": 0.4}), ("magnitude_prune_svd", {"density": 0.4}),
    ("dare_linear", {"density": 1.0}), ("dare_ties", {"density": 1.0}), ("dare_linear_svd", {"density": 1.0}),
])
def test_logits_equal_peft_add_weighted_adapter(saved, kind, kwargs):
    ours = _ours(saved)
    combine_adapters(ours, ["a", "b", "c"], W, "mix", combination_type=kind, **kwargs)
    dt.set_active(ours, "mix")
    assert torch.allclose(no_grad_logits(ours, IDS), _peft_logits(saved, kind, **kwargs), atol=1e-4, rtol=0)


def test_directories_combine_like_attached_adapters_and_leave_nothing_behind(saved):
    ours = _ours(saved, ("a",))
    combine_adapters(ours, ["a", saved["b"], str(saved["c"])], W, "mix", combination_type="cat")
    assert sorted(dt.adapters(ours)) == ["a", "mix"] and dt.active_adapters(ours) == ["a"]
    reference = _ours(saved)
    combine_adapters(reference, ["a", "b", "c"], W, "mix", combination_type="cat")
    for model in (ours, reference):
        dt.set_active(model, "mix")
    assert torch.equal(no_grad_logits(ours, IDS), no_grad_logits(reference, IDS))


def test_cat_is_the_exact_weighted_sum_of_deltas_with_negative_weights(saved):
    model = _ours(saved)
    weights = [1.0, -0.5, 2.0]
    combine_adapters(model, ["a", "b", "c"], weights, "neg", combination_type="cat")
    sites = dt.adapters(model)
    for path, delta in sites["neg"].deltas(model):
        want = sum(w * dict(sites[n].deltas(model))[path].delta_weight() for n, w in zip("abc", weights)
                   if path in dict(sites[n].deltas(model)))
        assert torch.allclose(delta.delta_weight(), want, atol=1e-6)
    assert dt.adapter_configs(model)["neg"].r == 12


def test_result_is_an_ordinary_adapter_saved_mergeable_and_read_by_peft(saved, tmp_path):
    model = _ours(saved)
    combine_adapters(model, ["a", "b", "c"], W, "mix", combination_type="svd", svd_rank=4, activate=True)
    unmerged = no_grad_logits(model, IDS)
    dt.save_adapter(model, tmp_path / "mix", "mix")
    dt.merge(model)
    assert torch.allclose(no_grad_logits(model, IDS), unmerged, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "mix")).eval()
    assert torch.allclose(no_grad_logits(theirs, IDS), unmerged, atol=1e-5)
    assert dt.read_adapter(tmp_path / "mix")[0].r == 4


def test_lorahub_sums_factors_at_the_shared_scale(saved):
    model = make_tiny_llama()
    for i, n in enumerate("xy"):
        torch.manual_seed(20 + i)
        dt.attach(model, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"]), n)
    combine_adapters(model, ["x", "y"], [0.5, -1.25], "hub", combination_type="lorahub")
    ds = {n: dict(a.deltas(model)) for n, a in dt.adapters(model).items()}
    for path, delta in ds["hub"].items():
        A = 0.5 * ds["x"][path].lora_A.weight - 1.25 * ds["y"][path].lora_A.weight
        B = 0.5 * ds["x"][path].lora_B.weight - 1.25 * ds["y"][path].lora_B.weight
        assert torch.allclose(delta.delta_weight(), 2.0 * B @ A, atol=1e-6)


def test_ia3_is_linear_and_equals_peft(tmp_path):
    dirs = {}
    for i, (n, targets) in enumerate({"p": ["k_proj", "down_proj"], "q": ["v_proj", "down_proj"]}.items()):
        model = make_tiny_llama()
        torch.manual_seed(30 + i)
        dt.attach(model, dt.IA3Config(target_modules=targets, feedforward_modules=["down_proj"], init_ia3_weights=False), n)
        dirs[n] = dt.save_adapter(model, tmp_path / n, n)
    ours = make_tiny_llama()
    combine_adapters(ours, [dirs["p"], dirs["q"]], [0.6, 0.4], "mix", activate=True)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(dirs["p"]), adapter_name="p")
    theirs.load_adapter(str(dirs["q"]), adapter_name="q")
    theirs.add_weighted_adapter(["p", "q"], [0.6, 0.4], "mix")
    theirs.set_adapter("mix")
    assert torch.allclose(no_grad_logits(ours, IDS), no_grad_logits(theirs.eval(), IDS), atol=1e-5)


# ---- the rules on small tensors: known answers, and equal to peft.utils.merge_utils -------------------------
def test_known_answers_on_small_matrices():
    t1, t2 = torch.tensor([[3.0, -1.0], [0.5, 2.0]]), torch.tensor([[-1.0, -4.0], [1.0, 0.0]])
    w = torch.tensor([1.0, 0.5])
    assert torch.equal(merge_ops.task_arithmetic([t1, t2], w), torch.tensor([[2.5, -3.0], [1.0, 2.0]]))
    # density 0.5 keeps the 2 largest |values| of each: t1 -> [[3,0],[0,2]], t2 -> [[0,-4],[1,0]]
    assert torch.equal(merge_ops.magnitude_prune([t1, t2], w, 0.5), torch.tensor([[3.0, -2.0], [0.5, 2.0]]))
    # TIES: elected signs + (3 vs 0), - (0 vs -4), + , +; the agreeing weighted values averaged
    assert torch.equal(merge_ops.ties([t1, t2], w, 0.5), torch.tensor([[3.0, -2.0], [0.5, 2.0]]))
    t3 = torch.tensor([[-2.0, 1.0], [-0.5, -3.0]])
    got = merge_ops.ties([t1, t2, t3], torch.ones(3), 1.0)  # signs: + (3-1-2=0 -> +), - , + , -
    assert torch.equal(got, torch.tensor([[3.0, -2.5], [0.75, -3.0]]))


@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_rules_equal_peft_merge_utils_with_the_same_seed(density, sign):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    w = torch.tensor([0.9, -0.4, 0.6])
    assert torch.equal(merge_ops.ties(tensors, w, density, sign), merge_utils.ties(tensors, w, density, sign))
    assert torch.equal(merge_ops.magnitude_prune(tensors, w, density), merge_utils.magnitude_prune(tensors, w, density))
    torch.manual_seed(7)
    theirs = merge_utils.dare_ties(tensors, w, density, sign), merge_utils.dare_linear(tensors, w, density)
    gen = torch.Generator().manual_seed(7)
    ours = (merge_ops.dare_ties(tensors, w, density, sign, generator=gen),
            merge_ops.dare_linear(tensors, w, density, generator=gen))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    stacked = torch.stack(tensors)
    assert torch.equal(merge_ops.majority_sign_mask(stacked, sign), merge_utils.calculate_majority_sign_mask(stacked, sign))
    torch.manual_seed(1)
    pruned = merge_utils.prune(tensors[0], density, "random", rescale=True)
    assert torch.equal(merge_ops.prune(tensors[0], density, "random", rescale=True,
                                       generator=torch.Generator().manual_seed(1)), pruned)


def test_dare_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(saved):
    outs = []
    for _ in range(2):
        model = _ours(saved)
        state = torch.random.get_rng_state()
        combine_adapters(model, ["a", "b", "c"], W, "d", combination_type="dare_ties", density=0.5, seed=3)
        assert torch.equal(torch.random.get_rng_state(), state)
        outs.append({k: v.clone() for k, v in dt.adapter_tensors(model, "d").items()})
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


# ---- refusals: each names the reason, and nothing changes ---------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=[0.5, -0.5], combination_type="linear"), "negative"),
    (dict(weights=[0.5], combination_type="cat"), "one number per adapter"),
    (dict(weights=[0.5, math.nan], combination_type="cat"), "finite"),
    (dict(weights=[0.5, 0.5], combination_type="ties"), "density"),
    (dict(weights=[0.5, 0.5], combination_type="ties", density=1.5), "density"),
    (dict(weights=[0.5, 0.5], combination_type="nope"), "combination_type"),
    (dict(weights=[0.5, 0.5], combination_type="svd", svd_rank=0), "svd_rank"),
    (dict(weights=[0.5, 0.5], combination_type="svd", svd_clamp=2.0), "svd_clamp"),
    (dict(weights=[0.5, 0.5], combination_type="ties", density=0.5, majority_sign_method="max"), "majority_sign"),
    (dict(weights=[0.5, 0.5], combination_type="cat", name="a"), "already attached"),
])
def test_bad_settings_are_refused_before_anything_changes(saved, kwargs, match):
    model = _ours(saved, ("a", "b"))
    before = capture_state(model)
    kwargs = {"name": "mix", **kwargs}
    with pytest.raises(CombineError, match=match):
        combine_adapters(model, ["a", "b"], kwargs.pop("weights"), kwargs.pop("name"), **kwargs)
    assert_unchanged(model, before)


def test_other_methods_ranks_and_bases_are_refused_with_the_reason(saved):
    model = _ours(saved, ("a",))
    dt.attach(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), "r2", activate=False)
    dt.attach(model, dt.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), "dora", activate=False)
    dt.attach(model, dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "ia3", activate=False)
    before = capture_state(model)
    with pytest.raises(CombineError, match="one rank r"):
        combine_adapters(model, ["a", "r2"], [1, 1], "x", combination_type="linear")
    with pytest.raises(CombineError, match="DoRA"):
        combine_adapters(model, ["a", "dora"], [1, 1], "x", combination_type="cat")
    with pytest.raises(CombineError, match="one method"):
        combine_adapters(model, ["a", "ia3"], [1, 1], "x", combination_type="cat")
    with pytest.raises(CombineError, match="neither an attached adapter"):
        combine_adapters(model, ["a", "nowhere"], [1, 1], "x", combination_type="cat")
    assert_unchanged(model, before)
    combine_adapters(model, ["a", "r2"], [1, 1], "x", combination_type="cat")  # cat takes any ranks
    assert dt.adapter_configs(model)["x"].r == 6


def test_adapters_for_different_bases_are_refused():
    model = make_tiny_llama()
    for n, base in (("x", "org/base-one"), ("y", "org/base-two")):
        dt.attach(model, dt.LoraConfig(r=4, target_modules=["q_proj"], base_model_name_or_path=base), n, activate=False)
    with pytest.raises(CombineError, match="different base models"):
        combine_adapters(model, ["x", "y"], [1, 1], "xy", combination_type="cat")
