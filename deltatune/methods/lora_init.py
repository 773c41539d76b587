"""LoRA initialisations beyond kaiming/gaussian (METHODS.md §19; peft's `init_lora_weights` spellings).

    init_lora_weights     base the adapter trains on          A, B at step 0                 the file
    "pissa"               W (see below)                       √(Σ_r/s)·V_rᵀ, U_r·√(Σ_r/s)    rank-2r LoRA for W
    "pissa_niter_K"       same, K subspace iterations         torch.svd_lowrank, seeded      rank-2r LoRA for W
    "olora"               W (see below)                       R[:r], Q[:, :r] of W = QR      rank-2r LoRA for W
    "loftq" + loftq_config = {loftq_bits: 4, loftq_iter: T}
                          Q_T = nf4(W − B_{T−1}A_{T−1})       SVD_r(W − Q_T) / √s            recipe: Q_T rebuilt
    "pissa" + loftq_config (QPiSSA, a deltatune extension)
                          Q_T = nf4(W − s·B_T A_T)             PiSSA of W − Q_{T−1}            recipe: Q_T rebuilt
    replace_lora_weights_loftq(model)   the stock NF4 base    SVD_r(W − dequant(Q)) / √s     plain LoRA (stock NF4)
    "eva" + eva_config    W                                   A: top-r PCA of layer inputs   plain LoRA for W
                          (lora_eva.py)
                          (the training loop's pre-pass over data; uniform ranks, rho = 1)   B = 0

**16-bit PiSSA and OLoRA leave W alone.** peft replaces W by W_res = W − s·B0A0 and, to save for the
original base, converts the adapter to rank 2r: A' = [A; A0], B' = [B, −B0], so W + s·B'A' = W_res + s·BA.
Here the delta keeps the initial factors (A0, B0, frozen buffers) and computes W·x + s·(BA − B0A0)·x: in exact
arithmetic PiSSA's function and gradients, with the original W in the model (other adapters, disable_adapters,
delete and merge see the true base), at the cost of one more rank-r product per layer. The file is peft's
rank-2r conversion (the LoRA method's save view: r → 2r, α → 2α or α·√2 under rsLoRA, init_lora_weights →
True), so peft loads it on the original base with the trained model's logits.

**4-bit starts (LoftQ, QPiSSA)** need the full-precision weights: attaching on a full-precision base quantizes
each targeted linear layer itself (NF4, blocksize 64, no double quantization, as peft's loftq_init) into
`Linear4bit` holding Q_T, before the deltas are built (the method's `resolve` step). No LoRA file can hold the
quantization error, so the file keeps the recipe (init_lora_weights and loftq_config, r, α): loading it onto the
original full-precision base runs the same deterministic decompositions (float64 SVD; svd_lowrank seeded per
layer) and rebuilds Q_T, then the trained A and B load over the initial ones. The file's metadata records
`deltatune_base_quantization: loftq-nf4` (or qpissa-nf4), so `--quantize auto` loads the full-precision base
for it. peft scales LoftQ's factors by nothing (start Q_T + s·BA, LoftQ's only at s = 1, peft issue #1982);
deltatune divides both by √s, so the start is Q_T + L·R for any α.

The decompositions themselves (pure tensor functions of one weight) are `lora_factors.py`.
"""
from __future__ import annotations

import math
import re
import sys
import time
from typing import Any

import torch
from torch import nn

from ..core.config import ConfigError
from .lora_factors import (  # noqa: F401  (re-exported: the decompositions live in lora_factors.py)
    _svd_split,
    loftq_factors,
    olora_factors,
    pissa_factors,
    qpissa_factors,
)

NITER = re.compile(r"pissa_niter_(\d+)")
PLAIN = (True, False, "gaussian")
NAMES = ("pissa", "pissa_niter_[K]", "olora", "loftq", "eva")
FACTORS_ATTR = "_deltatune_init_factors"  # model attribute: module name -> (A, B), from resolve to the deltas


# ---- validation ------------------------------------------------------------------------------------------
def validate(config: Any) -> None:
    """ConfigError, naming the field, for an init deltatune does not know or settings that do not fit it."""
    if config.loftq_config:  # flags give strings: --adapter.loftq_config.loftq_iter 2
        object.__setattr__(config, "loftq_config", {k: int(v) if isinstance(v, str) and v.strip().isdigit() else v
                                                    for k, v in config.loftq_config.items()})
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights.lower() in ("true", "false"):
        object.__setattr__(config, "init_lora_weights", config.init_lora_weights.lower() == "true")  # from a flag
    init = config.init_lora_weights
    if init in PLAIN:
        if config.loftq_config:
            raise ConfigError(f"loftq_config is used by init_lora_weights='loftq' (LoftQ) and 'pissa' (QPiSSA), not "
                              f"{init!r}; remove it")
        return
    if not isinstance(init, str) or not (init in ("pissa", "olora", "loftq", "eva") or NITER.fullmatch(init)):
        raise ConfigError(f"init_lora_weights must be True, False, 'gaussian' or one of {', '.join(NAMES)} (peft's "
                          f"spellings, e.g. 'pissa_niter_16'), got {init!r}")
    match = NITER.fullmatch(init)
    if match and int(match.group(1)) < 1:
        raise ConfigError(f"init_lora_weights={init!r}: the number of subspace iterations must be at least 1")
    if config.use_dora:
        raise ConfigError(f"init_lora_weights={init!r} with use_dora is not supported; use one of them")
    if init == "loftq" and not config.loftq_config:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
    if config.loftq_config:
        if init not in ("loftq", "pissa") and not match:
            raise ConfigError(f"loftq_config is used by init_lora_weights='loftq' (LoftQ) and 'pissa' (QPiSSA), not "
                              f"{init!r}; remove it")
        unknown = sorted(set(config.loftq_config) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise ConfigError(f"loftq_config has unknown key {unknown[0]!r}; its keys are loftq_bits and loftq_iter")
        bits, iters = config.loftq_config.get("loftq_bits", 4), config.loftq_config.get("loftq_iter", 1)
        if bits != 4:
            raise ConfigError(f"loftq_config.loftq_bits must be 4 (NF4; peft's 8-bit form is not implemented), got {bits!r}")
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ConfigError(f"loftq_config.loftq_iter must be an integer >= 1, got {iters!r}")
    if config.eva_config is not None and init != "eva":
        raise ConfigError(f"eva_config is used by init_lora_weights='eva' only, not {init!r}; remove it")
    if init == "eva":
        from .lora_eva import eva_settings

        eva_settings(config)


def is_special(config: Any) -> bool:
    """A LoRA init beyond peft's plain ones; False for any other method's config (it has no such option)."""
    return getattr(config, "init_lora_weights", True) not in PLAIN


def quantizes_base(config: Any) -> bool:
    """LoftQ and QPiSSA: the init stores the base in NF4 itself."""
    return is_special(config) and bool(getattr(config, "loftq_config", None))


def changes_function(config: Any) -> bool:
    """16-bit PiSSA/OLoRA: the delta carries its initial factors, and the file is the rank-2r conversion."""
    init = config.init_lora_weights
    return isinstance(init, str) and (init in ("pissa", "olora") or bool(NITER.fullmatch(init))) \
        and not config.loftq_config



class _Progress:
    """One stderr line per 10% of the work (layers, or batches), once it has taken more than two seconds."""

    def __init__(self, what: str, total: int, unit: str = "layers") -> None:
        self.what, self.total, self.unit, self.start, self.shown = what, total, unit, time.monotonic(), -1

    def step(self, done: int) -> None:
        tenth = done * 10 // self.total
        if tenth > self.shown and time.monotonic() - self.start > 2:
            self.shown = tenth
            print(f"deltatune: {self.what}: {done}/{self.total} {self.unit} ({time.monotonic() - self.start:.0f} s)",
                  file=sys.stderr, flush=True)


# ---- the delta's step-0 values --------------------------------------------------------------------------
def initialise(delta: nn.Module, target: Any, config: Any) -> None:
    """Set A and B of a new LoraLinear (and, for 16-bit PiSSA/OLoRA, its frozen initial factors)."""
    init = config.init_lora_weights
    if init == "eva":  # B = 0 (the base at start); A comes from the pre-pass over data (eva_prepass)
        nn.init.kaiming_uniform_(delta.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(delta.lora_B.weight)
        return
    r, scaling = delta.lora_A.weight.shape[0], delta.scaling
    factors = getattr(target.model, FACTORS_ATTR, {}).pop(target.name, None)
    if quantizes_base(config):
        if factors is None:
            raise ConfigError(f"init_lora_weights={init!r} with loftq_config quantizes the base itself, which the "
                              f"attach step did for no layer {target.name!r}")
        A, B = factors
    else:
        if target.weight.quantized:
            raise ConfigError(f"init_lora_weights={init!r} decomposes the full-precision weight, but {target.name} is "
                              "quantized; attach it to the full-precision base (for a 4-bit residual: QPiSSA, "
                              "loftq_config={'loftq_bits': 4, 'loftq_iter': 1} with quantize: null)")
        weight = target.weight.value().float()
        if init == "olora":
            A, B = olora_factors(weight, r)
        else:
            match = NITER.fullmatch(init)
            A, B = pissa_factors(weight, r, scaling, int(match.group(1)) if match else None, target.name)
        delta.register_buffer("init_A", A.clone(), persistent=False)  # (r, d_in), frozen
        delta.register_buffer("init_B", B.clone(), persistent=False)  # (d_out, r)
    with torch.no_grad():
        delta.lora_A.weight.copy_(A)
        delta.lora_B.weight.copy_(B)


# ---- 4-bit starts: the base quantized before the deltas are built (the method's resolve step) ------------
def prepare_base(model: nn.Module, config: Any) -> Any:
    """LoftQ / QPiSSA: every targeted nn.Linear becomes a `Linear4bit` holding Q_T, and its (A, B) are kept
    for the delta. All layers are computed before the first is replaced. Other inits: nothing. Returns config."""
    if not quantizes_base(config):
        return config
    from ..core.model import adapters
    from ..core.targets import find_targets
    from ..quant.linear4bit import Linear4bit

    others = sorted(adapters(model))
    if others:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} with loftq_config quantizes the base for "
                          f"itself, which would change it under the adapters already attached ({', '.join(others)}); "
                          "attach (or serve) a LoftQ/QPiSSA adapter on a base of its own")
    names = find_targets(model, config, lambda m: isinstance(m, nn.Linear) or getattr(m, "quantized", False))
    quantized = [n for n in names if type(model.get_submodule(n)) is not nn.Linear]
    if quantized:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} with loftq_config quantizes the base "
                          f"itself from its full-precision weights, but {quantized[0]} is "
                          f"{type(model.get_submodule(quantized[0])).__name__}; load the base in full precision "
                          "(quantize: null / --quantize none) and attach to it")
    what = "LoftQ" if config.init_lora_weights == "loftq" else "QPiSSA"
    iters = config.loftq_config.get("loftq_iter", 1)
    match = NITER.fullmatch(str(config.init_lora_weights))
    built: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    progress = _Progress(f"{what} init ({iters} iteration{'s' * (iters > 1)})", len(names))
    for i, name in enumerate(names):
        r, scaling = config.rank_and_scale(name)
        weight = model.get_submodule(name).weight.detach()
        if what == "LoftQ":
            built[name] = loftq_factors(weight, r, scaling, iters)
        else:
            built[name] = qpissa_factors(weight, r, scaling, iters, int(match.group(1)) if match else None, name)
        progress.step(i + 1)
    for name, (state, A, B) in built.items():
        linear = model.get_submodule(name)
        layer = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=torch.float32, double_quant=False, blocksize=64,
                           bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32,
                           device=linear.weight.device)
        layer.load_nf4(state)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    setattr(model, FACTORS_ATTR, {name: (A, B) for name, (_, A, B) in built.items()})
    model.deltatune_quantization = {"name": f"{what.lower()}-nf4", "quant_type": "nf4", "blocksize": 64,
                                    "double_quant": False, "compute_dtype": "float32", "modules": len(built)}
    return config


def base_digest(model: nn.Module) -> str:
    """sha256 of every NF4 layer's codes and constants, in module order: what a rebuilt base must reproduce."""
    import hashlib

    from ..quant.model import quantized_layers

    digest = hashlib.sha256()
    for name, layer in quantized_layers(model):
        digest.update(name.encode())
        for tensor in layer.state_tensors():
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- the file ---------------------------------------------------------------------------------------------
def save_view(model: nn.Module, adapter: Any, tensors: dict[str, torch.Tensor]):
    """What the LoRA file holds. 16-bit PiSSA/OLoRA: peft's rank-2r conversion for the original base
    (lora_A ← [A; A0], lora_B ← [B, −B0]; r, α and the patterns doubled, α·√2 under rsLoRA; init True).
    LoftQ/QPiSSA: the live tensors and the recipe, with the rebuilt base's digest in the note. Else the live state."""
    from ..core.registry import SavedView

    config = adapter.config
    if quantizes_base(config):
        return SavedView(config, tensors, f"{config.init_lora_weights} with loftq_config {dict(config.loftq_config)}: "
                         f"the NF4 base is rebuilt from the original weights (sha256 {base_digest(model)[:16]})")
    if not changes_function(config):
        return SavedView(config, tensors)
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("saving a PiSSA/OLoRA adapter with use_rslora and rank_pattern/alpha_pattern for the "
                          "original base is impossible (a doubled α_l gives 2α_l/√(2r) ≠ α_l/√r), as in peft")
    out = dict(tensors)
    for path, delta in adapter.deltas(model):
        if getattr(delta, "init_A", None) is None:
            continue
        a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        out[a_key] = torch.cat([tensors[a_key].detach(), delta.init_A.to(tensors[a_key].dtype)], dim=0)  # (2r, d_in)
        out[b_key] = torch.cat([tensors[b_key].detach(), -delta.init_B.to(tensors[b_key].dtype)], dim=1)  # (d_out, 2r)
    factor = math.sqrt(2) if config.use_rslora else 2
    saved = config.replace(r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True,
                           rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                           alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return SavedView(saved, out, f"{config.init_lora_weights} converted to a rank-{2 * config.r} LoRA for the "
                     "original base (peft's conversion)")


# ---- peft's replace_lora_weights_loftq: the stock 4-bit base, LoRA from its quantization error -----------
def replace_lora_weights_loftq(model: nn.Module, name: str = "default", weights: Any = None,
                               callback: Any = None) -> list[str]:
    """For every LoRA layer of adapter `name` on a 4-bit base layer: (A, B) = SVD_r(W − dequant(Q)) with the √Σ
    split, divided by √s (so the start is dequant(Q) + the rank-r part of the error, for any α), the base left as
    it is (peft's `replace_lora_weights_loftq`, one iteration). The adapter stays a plain LoRA for that stock
    4-bit base (its file records e.g. nf4-dq, and `--quantize auto` rebuilds that base).

    weights: the full-precision weights, a mapping "<module>.weight" -> tensor or a transformers directory
        (its *.safetensors are read one tensor at a time); None: the model's own `config._name_or_path`.
    callback(model, module_name) -> bool: called after each layer; False puts that layer's A and B back.
    Returns the names of the layers replaced."""
    from ..core.model import adapters
    from ..core.sites import is_quantized
    from ..core.state import require_attached

    require_attached(model, [name])
    deltas = {path: delta for path, delta in adapters(model)[name].deltas(model)
              if hasattr(delta, "lora_A") and is_quantized(model.get_submodule(_site_path(model, path)).base_layer)}
    if not deltas:
        raise ValueError(f"adapter {name!r} has no LoRA layer on a 4-bit base layer (load the base with "
                         "quantize='nf4' and attach a plain LoRA first)")
    full = _full_precision_weights(model, weights, [f"{p}.weight" for p in deltas])
    progress, done = _Progress("LoftQ replace", len(deltas)), []
    for i, (path, delta) in enumerate(deltas.items()):
        base = model.get_submodule(_site_path(model, path)).base_layer
        r = delta.lora_A.weight.shape[0]
        A, B = _svd_split(full[f"{path}.weight"].double() - base.dequantize_weight().double(), r)
        root = math.sqrt(delta.scaling)
        before = delta.lora_A.weight.detach().clone(), delta.lora_B.weight.detach().clone()
        with torch.no_grad():
            delta.lora_A.weight.copy_(A / root)
            delta.lora_B.weight.copy_(B / root)
        if callback is not None and not callback(model, path):
            with torch.no_grad():
                delta.lora_A.weight.copy_(before[0])
                delta.lora_B.weight.copy_(before[1])
        else:
            done.append(path)
        progress.step(i + 1)
    return done


def _site_path(model: nn.Module, logical: str) -> str:
    from ..core.adapter import resolve

    return resolve(model, logical)


def _full_precision_weights(model: nn.Module, weights: Any, keys: list[str]) -> dict[str, torch.Tensor]:
    from pathlib import Path

    if isinstance(weights, dict):
        missing = [k for k in keys if k not in weights]
        if missing:
            raise KeyError(f"weights has no {missing[0]!r} (needed: the full-precision weight of every 4-bit LoRA layer)")
        return {k: weights[k] for k in keys}
    source = weights if weights is not None else getattr(getattr(model, "config", None), "_name_or_path", None)
    if source is None:
        raise ValueError("replace_lora_weights_loftq needs the full-precision weights: pass weights= (a mapping or a "
                         "transformers directory)")
    from ..models import resolve_model_path
    from ..quant.load import read_safetensors

    directory = Path(resolve_model_path(str(source)))
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        raise ValueError(f"replace_lora_weights_loftq reads the full-precision weights from safetensors files; "
                         f"{directory} has none (pass weights=)")
    wanted, found = set(keys), {}
    for file in files:
        for key, tensor in read_safetensors(file, skip=set()):
            if key in wanted:
                found[key] = tensor.float()
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"{directory} has no tensor {missing[0]!r}")
    return found
