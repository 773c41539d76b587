"""The segmented decode kernel of deltatune.serve.fused_lora (rows grouped by adapter, each adapter's factors read
once): equal to the stacked kernel and to each row run alone with only its adapter, in fp32 and bf16, over mixed
batches (base rows, mixed ranks, padded groups, DyLoRA at a rank, VeRA, AdaLoRA), a cached superset stack, and
adapters that change between forwards; the cost rule's choice."""
from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

import deltatune as dt
from deltatune.core.model import route
from deltatune.serve import Engine
from deltatune.serve import fused_lora as fl
from deltatune.serve import sgmv
from deltatune.serve.fused_lora import FusedLora
from serve_helpers import add_lora, byte_tokenizer, hf_greedy, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in dt.adapter_tensors(model, name).values():
            if isinstance(tensor, torch.nn.Parameter):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny Llama with LoRA of ranks 2, 4 (x3), 8 on all linear layers or some, DyLoRA served at rank 3,
    VeRA and AdaLoRA."""
    model = tiny_llama()
    add_lora(model, "r2", 2, seed=1, targets=ALL)
    for i, name in enumerate(("r4a", "r4b", "r4c")):
        add_lora(model, name, 4, seed=2 + i, targets=ALL)
    add_lora(model, "r8qv", 8, seed=5)
    dt.attach(model, dt.DyLoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]), "dy",
              activate=False)
    _randomise(model, "dy", 6)
    path = tmp_path_factory.mktemp("dy") / "dy"
    dt.save_adapter(model, path, "dy")
    dt.delete_adapter(model, "dy")
    dt.load_adapter(model, f"{path}@rank=3", "dy3", activate=False)
    dt.attach(model, dt.VeraConfig(r=16, target_modules=["q_proj", "v_proj", "up_proj"]), "vera", activate=False)
    _randomise(model, "vera", 7)
    dt.attach(model, dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["k_proj", "o_proj"]),
              "ada", activate=False)
    _randomise(model, "ada", 8)
    return model.eval()


NAMES = ["r4a", None, "r2", "r4a", "dy3", "r4b", "r8qv", "vera", "r4a", "ada", None, "r4c", "r2", "vera"]


def _fused_logits(model, fused: FusedLora, ids: torch.Tensor, names) -> torch.Tensor:
    with torch.no_grad(), fused.apply(names) as routed, route(model, routed):
        return model(ids).logits.float()


def _alone(model, ids: torch.Tensor, names) -> torch.Tensor:
    """Each row alone with only its adapter active (the core's unfused delta; None: the base)."""
    rows = []
    with torch.no_grad():
        for row, name in zip(ids, names):
            if name is None:
                with dt.disable_adapters(model):
                    rows.append(model(row[None]).logits.float())
            else:
                dt.set_active(model, name)
                rows.append(model(row[None]).logits.float())
    return torch.cat(rows)


def _kernels_used(monkeypatch) -> list[str]:
    used: list[str] = []
    for kind in ("_stacked", "_segmented", "_gathered"):
        original = getattr(fl._Kernel, kind)

        def spy(self, x, output, original=original, kind=kind):
            used.append(kind)
            return original(self, x, output)
        monkeypatch.setattr(fl._Kernel, kind, spy)
    return used


def _compiler() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return (shutil.which("c++") is not None or shutil.which("g++") is not None) and is_ninja_available()


@pytest.mark.parametrize("compiled", [True, False], ids=["sgmv", "torch-ops"])
def test_segmented_equals_stacked_and_each_row_alone_fp32(zoo, monkeypatch, compiled):
    if compiled and not _compiler():
        pytest.skip("no C++ compiler: the SGMV kernel cannot be built here (the torch-op path serves)")
    ids = torch.randint(0, 250, (len(NAMES), 1), generator=torch.Generator().manual_seed(0))  # one token a row
    used = _kernels_used(monkeypatch)
    fused = FusedLora(zoo, decode="segmented", sgmv=compiled)
    assert (fused._compiled() is not None) == compiled
    segmented = _fused_logits(zoo, fused, ids, NAMES)
    assert set(used) == {"_segmented"}
    stacked = _fused_logits(zoo, FusedLora(zoo, decode="stacked"), ids, NAMES)
    assert set(used) == {"_segmented", "_stacked"}
    alone = _alone(zoo, ids, NAMES)
    torch.testing.assert_close(segmented, stacked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segmented, alone, rtol=1e-5, atol=1e-5)
    base = _alone(zoo, ids, [None] * len(NAMES))
    assert all((segmented[i] - base[i]).abs().max() > 1e-3 for i, n in enumerate(NAMES) if n is not None)


def test_segmented_in_bf16(zoo):
    ids = torch.randint(0, 250, (len(NAMES), 1), generator=torch.Generator().manual_seed(1))
    reference = _alone(zoo, ids, NAMES)  # fp32
    bf16 = copy.deepcopy(zoo).to(torch.bfloat16)
    for p in (p for n, p in bf16.named_parameters() if "lora_" in n or "vera_" in n):
        p.data = p.data.float()  # adapters stay fp32 on a bf16 base, as the engine keeps them
    segmented = _fused_logits(bf16, FusedLora(bf16, decode="segmented", sgmv=False), ids, NAMES)
    stacked = _fused_logits(bf16, FusedLora(bf16, decode="stacked"), ids, NAMES)
    torch.testing.assert_close(segmented, stacked, rtol=2e-2, atol=2e-2)  # both fp32 products, bf16 outputs
    compiled = _fused_logits(bf16, FusedLora(bf16, decode="segmented"), ids, NAMES)  # one rounding, not two
    base_bf16 = _fused_logits(bf16, FusedLora(bf16), ids, [None] * len(NAMES))
    base = _alone(zoo, ids, [None] * len(NAMES))
    # as far from the fp32 reference as the bf16 base alone is from the fp32 base (bf16 rounding, not a wrong delta)
    bound = 2 * (base_bf16 - base).abs().max() + 1e-2
    for got in (segmented, compiled):
        assert (got - reference).abs().max() <= bound
    assert (compiled - reference).abs().mean() <= (segmented - reference).abs().mean() * 1.05


def test_a_cached_superset_stack_serves_a_subset(zoo, monkeypatch):
    fused = FusedLora(zoo, decode="segmented")
    ids = torch.randint(0, 250, (8, 1), generator=torch.Generator().manual_seed(2))
    first = ["r4a", "r4b", "r4c", "r2", "r4a", "r4b", "r4c", "r2"]
    _fused_logits(zoo, fused, ids, first)
    subset = ["r4c", None, "r4a", "r4c", "r4c", None, "r4a", None]  # 2 of the 3 rank-4 adapters, groups of 3 and 2
    got = _fused_logits(zoo, fused, ids, subset)
    assert len(fused._stacks) == 1  # the first stack served the subset
    torch.testing.assert_close(got, _alone(zoo, ids, subset), rtol=1e-5, atol=1e-5)


def test_adapters_changing_between_forwards(zoo):
    fused = FusedLora(zoo, decode="segmented")
    ids = torch.randint(0, 250, (6, 1), generator=torch.Generator().manual_seed(3))
    for names in (["r4a", "r4b", "r2", None, "r4a", "vera"], ["vera", "vera", "dy3", "r4b", "ada", None],
                  ["r2", "r2", "r2", "r2", "r4a", "r8qv"]):
        torch.testing.assert_close(_fused_logits(zoo, fused, ids, names), _alone(zoo, ids, names), rtol=1e-5, atol=1e-5)
    # an adapter replaced under the same name: the stack holding the old object is not reused
    names = ["r4a", "r4b", "r4a", "r2"]
    before = _fused_logits(zoo, fused, ids[:4], names)
    state = {k: v.clone() for k, v in dt.adapter_tensors(zoo, "r4b").items()}
    try:
        dt.delete_adapter(zoo, "r4b")
        add_lora(zoo, "r4b", 4, seed=40, targets=ALL)
        after = _fused_logits(zoo, fused, ids[:4], names)
        torch.testing.assert_close(after, _alone(zoo, ids[:4], names), rtol=1e-5, atol=1e-5)
        assert (after[1] - before[1]).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            for key, tensor in dt.adapter_tensors(zoo, "r4b").items():
                tensor.copy_(state[key])


def test_the_cost_rule(zoo, monkeypatch):
    used = _kernels_used(monkeypatch)
    ids = torch.randint(0, 250, (8, 1), generator=torch.Generator().manual_seed(4))
    fused = FusedLora(zoo)
    _fused_logits(zoo, fused, ids, ["r4a"] * 4 + [None] * 4)  # one adapter: Σr = r
    assert set(used) == {"_stacked"}
    used.clear()
    _fused_logits(zoo, fused, ids, ["r4a", "r4b", "r4c", "r2"] * 2)  # Σr = 14 >= 4 x 4 at no site: 14 < 16
    assert set(used) == {"_stacked"}
    used.clear()
    names = ["r4a", "r4b", "r4c", "r2", "vera", "dy3", "ada", "r8qv"]  # q_proj: Σr 4·3+2+16+3+8 = 41 >= 4 x 16
    _fused_logits(zoo, fused, ids, names)
    assert "_segmented" in used and "_stacked" in used
    used.clear()
    prompt = torch.randint(0, 250, (8, 5), generator=torch.Generator().manual_seed(5))
    _fused_logits(zoo, fused, prompt, names)  # many tokens a row: the gathered prefill kernel
    assert set(used) == {"_gathered"}
    with pytest.raises(ValueError, match="decode"):
        FusedLora(zoo, decode="fast")


def test_engine_with_segmented_decode_matches_generate_alone(zoo):
    tok = byte_tokenizer()
    engine = Engine(zoo, tok, max_batch_size=5)
    engine.fused.decode = "segmented"
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 250, (int(n),), generator=g).tolist() for n in (4, 9, 6, 3, 7, 5, 8)]
    names = ["r4a", "vera", "r4a", None, "dy3", "r2", "r4b"]  # 7 requests, 5 at a time: rows change between steps
    got = [o.token_ids for o in engine.generate(prompts, names, max_new_tokens=6)]
    assert got == [hf_greedy(zoo, p, n, 6) for p, n in zip(prompts, names)]


@pytest.mark.parametrize("decode", ["segmented", "stacked"])
def test_a_site_of_rank_zero_adds_nothing(tmp_path, decode):
    """An AdaLoRA file whose allocation pruned every triplet of a site (rank 0 there) serves as its other sites."""
    model = tiny_llama()
    targets = ["q_proj", "v_proj"]
    dt.attach(model, dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets), "ada")
    _randomise(model, "ada", 3)
    pattern = {f"{path}.lora_E": [True, False, True, False] for path in (
        f"model.layers.{i}.self_attn.{t}" for i in range(len(model.model.layers)) for t in targets)}
    pattern["model.layers.0.self_attn.q_proj.lora_E"] = [False] * 4
    dt.update_config(model, "ada", rank_pattern=pattern)
    dt.save_adapter(model, tmp_path / "ada", "ada")
    served = tiny_llama()
    dt.load_adapter(served, tmp_path / "ada", "ada")
    add_lora(served, "r2", 2, seed=1, targets=ALL)
    names = ["ada", "r2", None, "ada"] * 2
    ids = torch.randint(0, 250, (len(names), 1), generator=torch.Generator().manual_seed(0))
    fused = _fused_logits(served, FusedLora(served, decode=decode), ids, names)
    torch.testing.assert_close(fused, _alone(served, ids, names), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False], ids=["sgmv", "torch-ops"])
@pytest.mark.parametrize("names", [["r4a", "r4b", "r4c", "r4b", "r4a", "r4c"],  # every row in one group
                                   ["r4a", "r4a", "r4a", "r4b", "r4c"]])  # the same, padded
def test_a_batch_in_one_rank_group(zoo, names, compiled):
    ids = torch.randint(0, 250, (len(names), 1), generator=torch.Generator().manual_seed(7))
    got = _fused_logits(zoo, FusedLora(zoo, decode="segmented", sgmv=compiled), ids, names)
    torch.testing.assert_close(got, _alone(zoo, ids, names), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_sgmv_kernel_against_its_formula(dtype):
    """out[row] += s_a·B_aᵀ(A_a·x[row]) for each segment's rows: segments of 0-3 rows, rows left out, widths that
    are no multiple of the 16 lanes, in the activations' dtype (fp32 inside, one rounding)."""
    kernel = sgmv.kernel()
    if kernel is None:
        pytest.skip("the SGMV kernel cannot be built here" if not _compiler() else "DELTATUNE_SGMV=0")
    g = torch.Generator().manual_seed(9)
    k, r, d_in, d_out, N = 5, 3, 37, 21, 9
    A, B = torch.randn(k, r, d_in, generator=g), torch.randn(k, r, d_out, generator=g)
    scale = torch.rand(k, generator=g) + 0.5
    x, out = torch.randn(N, d_in, generator=g).to(dtype), torch.randn(N, d_out, generator=g).to(dtype)
    ids = torch.tensor([3, 0, 4, 1])  # adapter 2 unused; adapter 4's segment is empty
    rows = torch.tensor([6, 1, 0, 8, 2, 5])  # rows 3, 4 and 7 are left as they are
    starts = torch.tensor([0, 2, 5, 5, 6])
    expected = out.float().clone()
    for s, a in enumerate(ids.tolist()):
        for row in rows[starts[s]:starts[s + 1]].tolist():
            expected[row] += scale[a] * (B[a].T @ (A[a] @ x[row].float()))
    got = out.clone()
    kernel(x, got, A, B, scale, rows, starts, ids)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=tol, atol=tol)
    assert torch.equal(got[[3, 4, 7]], out[[3, 4, 7]])
    threads = torch.get_num_threads()
    try:  # segments split over threads: each writes its own rows, the same values
        torch.set_num_threads(2)
        parallel = out.clone()
        kernel(x, parallel, A, B, scale, rows, starts, ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(parallel, got)
    for bad, message in ((dict(rows=torch.tensor([6, 1, 0, 8, 2, N])), "row out of range"),
                         (dict(ids=torch.tensor([3, 0, 5, 1])), "adapter id out of range"),
                         (dict(starts=torch.tensor([0, 2, 5, 5, 5])), "from 0 to len"),
                         (dict(x=x[:, :-1].contiguous()), "shapes disagree"), (dict(out=got.T.contiguous().T), "contiguous")):
        args = {**dict(x=x, out=got.clone(), A=A, B=B, scale=scale, rows=rows, starts=starts, ids=ids), **bad}
        before = args["out"].clone()
        with pytest.raises(RuntimeError, match=message):
            kernel(*args.values())
        assert torch.equal(args["out"], before)


def test_without_the_kernel_the_torch_op_path_serves(zoo, monkeypatch, caplog):
    """DELTATUNE_SGMV=0, or a build that fails (no compiler): a warning, then the same outputs through torch ops."""
    names = ["r4a", "r4b", "r2", None, "r4c", "r4a"]
    ids = torch.randint(0, 250, (len(names), 1), generator=torch.Generator().manual_seed(10))
    reference = _alone(zoo, ids, names)
    monkeypatch.setenv("DELTATUNE_SGMV", "0")
    assert sgmv.kernel() is None
    torch.testing.assert_close(_fused_logits(zoo, FusedLora(zoo, decode="segmented"), ids, names), reference,
                               rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("DELTATUNE_SGMV")
    monkeypatch.setattr(sgmv, "_built", {})

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'deltatune_sgmv': c++: command not found")
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", no_compiler)
    with caplog.at_level(logging.WARNING, logger="deltatune.serve"):
        assert sgmv.kernel() is None
    assert "could not be built" in caplog.text and "command not found" in caplog.text
    torch.testing.assert_close(_fused_logits(zoo, FusedLora(zoo, decode="segmented"), ids, names), reference,
                               rtol=1e-5, atol=1e-5)


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    """torch waits forever on a build lock its owner never released (a server killed while building)."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sgmv, "_built", {})
    directory = tmp_path / f"deltatune_sgmv_{sgmv._cpu_tag()}"
    directory.mkdir()
    (directory / "lock").touch()
    old = time.time() - sgmv.STALE_LOCK_S - 60
    os.utime(directory / "lock", (old, old))
    seen = []

    def fake_build(**kwargs):
        seen.append((kwargs["build_directory"], (directory / "lock").exists()))
        return type("Module", (), {"sgmv": staticmethod(lambda *a: None)})
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", fake_build)
    assert sgmv.kernel() is not None
    assert seen == [(str(directory), False)]
