"""EVA (Paischer, Hauzenberger et al. 2024, arXiv:2410.07170; METHODS.md §19.6) for LoRA: `init_lora_weights="eva"`.

B = 0 and A = the top-r principal components of each LoRA layer's inputs, computed in the training loop's
pre-pass over the data (`deltatune.train.prepass`; LoRA registers `prepass=eva_prepass`), so the model is the
base at step 0 and the file is a plain LoRA for the original base. Deviations from EVA, said where they apply:
uniform ranks only (rho = 1), no whitening, exact PCA from summed statistics instead of the incremental SVD.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.config import ConfigError
from .lora_init import _Progress


# ---- EVA: A from the principal components of each layer's inputs (the training loop's pre-pass) ----------
EVA_DEFAULTS = {"rho": 1.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}
EVA_EXAMPLES, EVA_BATCH = 64, 4  # examples of the pre-pass, per SVD batch (the EVA README's 4)


def eva_settings(config: Any) -> dict[str, Any]:
    """eva_config over the defaults; ConfigError for what deltatune does not implement (rank redistribution,
    whitening), naming the key."""
    given = dict(config.eva_config or {})
    unknown = sorted(set(given) - set(EVA_DEFAULTS))
    if unknown:
        raise ConfigError(f"eva_config has unknown key {unknown[0]!r}; its keys are {', '.join(EVA_DEFAULTS)}")
    settings = {**EVA_DEFAULTS, **given}
    if float(settings["rho"]) != 1.0:
        raise ConfigError(f"eva_config.rho={settings['rho']!r}: only rho=1 (every layer keeps rank r) is implemented; "
                          "EVA's rank redistribution (rho > 1, peft's default 2) is not")
    if settings["whiten"]:
        raise ConfigError("eva_config.whiten=True is not implemented; use whiten=False")
    if not 0 <= float(settings["tau"]) <= 1:
        raise ConfigError(f"eva_config.tau must be in [0, 1], got {settings['tau']!r}")
    return settings


def eva_prepass(model: nn.Module, config: Any, name: str, data: Any) -> None:
    """EVA (§19.6) with uniform ranks: for every LoRA linear layer of adapter `name`, A ← the top-r principal
    components (right-singular vectors of the mean-centred inputs, sklearn's sign convention: each row's
    largest entry positive) of the base model's inputs to that layer over the first 64 training examples
    (tokens kept by the attention mask and, with use_label_mask, labels != label_mask_value); B stays 0, so the
    model is the base at step 0 and the file is a plain LoRA for the original base. Exact PCA from summed
    statistics (Σx, Σxxᵀ, summed over processes), not EVA's incremental SVD with its τ stopping rule; layers
    with the same input (q/k/v, gate/up) share their statistics, as EVA shares their SVD."""
    if config.init_lora_weights != "eva":
        return
    from ..core.model import adapters, disable_adapters

    settings = eva_settings(config)
    examples = data.examples[:EVA_EXAMPLES]
    if not examples:
        raise ConfigError("init_lora_weights='eva' needs training data for its pass over the layer inputs; "
                          "deltatune train runs it on data.train (from Python: lora_init.eva_prepass with "
                          "deltatune.train.prepass.local_data)")
    deltas = {path: d for path, d in adapters(model)[name].deltas(model) if getattr(d, "lora_A", None) is not None}
    stats: dict[str, list[torch.Tensor]] = {}  # first layer of a group -> [Σx (d_in,), Σxxᵀ (d_in, d_in), count]
    group: dict[str, str] = {}  # layer -> the layer whose statistics it shares
    seen: dict[tuple, str] = {}
    keep: list[torch.Tensor] = []

    def hook(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if path not in group:  # first batch: layers fed the same values share one group (EVA hashes them)
                flat = x.detach().double()
                key = (tuple(x.shape), float(flat.sum()), float(flat.square().sum()), float(flat.reshape(-1)[:64].sum()))
                group[path] = seen.setdefault(key, path)
            if group[path] != path:
                return
            rows = x.reshape(-1, x.shape[-1])[keep[0]].float()
            acc = stats.setdefault(path, [torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                                          torch.zeros(x.shape[-1], x.shape[-1], device=x.device), torch.zeros(())])
            acc[0] += rows.sum(0, dtype=torch.float64)
            acc[1].addmm_(rows.T, rows)  # fp32 sums (d_in x d_in per group)
            acc[2] += rows.shape[0]
        return record

    from ..core.adapter import resolve

    handles = [model.get_submodule(resolve(model, p)).base_layer.register_forward_pre_hook(hook(p)) for p in deltas]
    progress = _Progress("EVA pass over the layer inputs", -(-len(examples) // EVA_BATCH), "batches")
    try:
        with torch.no_grad(), disable_adapters(model), data.autocast():
            for i, start in enumerate(range(0, len(examples), EVA_BATCH)):
                batch = data.collate(examples[start:start + EVA_BATCH])
                mask = batch["attention_mask"].bool()
                if settings["use_label_mask"] and "labels" in batch:
                    mask &= batch["labels"] != settings["label_mask_value"]
                keep[:] = [mask.reshape(-1)]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                progress.step(i + 1)
    finally:
        for handle in handles:
            handle.remove()
    components = {}
    for path, (s1, s2, count) in stats.items():
        s1, s2, count = data.reduce_sum(s1), data.reduce_sum(s2), data.reduce_sum(count)
        n = float(count)
        if n < 2:
            raise ConfigError(f"init_lora_weights='eva': {path} saw {int(n)} token(s) in the pass; more data is needed")
        mean = s1 / n
        covariance = s2.double() / n - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        components[path] = vectors.flip(-1).T  # (d_in, d_in) rows by decreasing variance
    for path, delta in deltas.items():
        r = delta.lora_A.weight.shape[0]
        top = components[group[path]][:r]
        signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        with torch.no_grad():
            delta.lora_A.weight.copy_((top * signs).to(delta.lora_A.weight.dtype))
            delta.lora_B.weight.zero_()
