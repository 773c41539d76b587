"""AdamW over the trainable parameters, LoRA+ learning rates, and the warmup + decay schedule.

Parameter groups (Loshchilov & Hutter 2019, arXiv:1711.05101, for decoupled weight decay):

    group            which parameters                                       lr                 weight decay
    lora_B           role "lora_B" (LoRA's B, declared by its delta)        lr · ratio (LoRA+)  cfg.weight_decay
    lora_embedding   role "lora_embedding" (LoRA on an nn.Embedding)        1e-6 (LoRA+)        cfg.weight_decay
    default          everything else that is trainable                      lr                  cfg.weight_decay
    ..._no_decay     any of the above that is 1-D (biases, norm weights)    as its group        0

LoRA+ (Hayou et al. 2024, arXiv:2402.12354, §4; shared/METHODS.md §2) trains B with a learning rate λ times
that of A, λ = `optim.loraplus_lr_ratio` (the paper suggests 2^4 = 16). Following peft's
`create_loraplus_optimizer` (peft 0.21, `peft/optimizers/loraplus.py`), the LoRA parameters of embedding
layers, A and B alike, get the fixed learning rate 1e-6 (peft's `loraplus_lr_embedding` default). One
deviation from that helper: peft also puts every 1-D parameter (biases) in B's group at lr · λ; here they keep
lr, as the paper's rule concerns B only. Without LoRA+ only the weight-decay split exists.

Every group carries `initial_lr`, the lr that the schedule's multiplier scales, so LambdaLR (and a resumed
run) scales each group from its own base.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.model import active_adapters, adapter_configs, parameter_roles
from .config import OptimConfig

LORAPLUS_EMBEDDING_LR = 1e-6  # peft's loraplus_lr_embedding default


def _kind(param: nn.Parameter, roles: dict[int, str], loraplus: bool) -> str:
    """The parameter's group: the role its adapter method declares (`Delta.lr_roles`) under LoRA+, else default."""
    role = roles.get(id(param), "default") if loraplus else "default"
    return role if role in ("lora_B", "lora_embedding") else "default"


def base_lr(model: nn.Module, cfg: OptimConfig) -> float:
    """optim.lr, or (unset) the recommended lr of the model's first active adapter's method."""
    if cfg.lr is not None:
        return cfg.lr
    configs = adapter_configs(model)
    active = [configs[n] for n in active_adapters(model)]
    return type(active[0]).recommended_lr if active else AdapterConfig.recommended_lr


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters (shared tensors once), as the table above."""
    loraplus = cfg.loraplus_lr_ratio is not None
    lr = base_lr(model, cfg)
    lrs = {"default": lr, "lora_B": lr * (cfg.loraplus_lr_ratio or 1.0), "lora_embedding": LORAPLUS_EMBEDDING_LR}
    groups: dict[str, dict] = {}
    roles = parameter_roles(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = _kind(param, roles, loraplus)
        decay = param.ndim >= 2
        key = kind if decay else f"{kind}_no_decay"
        group = groups.setdefault(key, {
            "name": key, "params": [], "param_names": [], "lr": lrs[kind], "initial_lr": lrs[kind],
            "weight_decay": cfg.weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters; attach an adapter (deltatune.attach) before training")
    return list(groups.values())


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether fused AdamW has a kernel for every parameter's device and dtype (torch checks lazily, at step 1)."""
    try:
        from torch.optim.optimizer import _device_dtype_check_for_fused
    except ImportError:  # older torch checks in the constructor, which build_optimizer catches
        return True
    try:
        for param in params:
            _device_dtype_check_for_fused(param)
    except RuntimeError:
        return False
    return True


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (betas, eps, weight decay from `cfg`), fused where the device and dtype allow, else foreach; with
    optim.name adamw_8bit / paged_adamw_8bit / paged_adamw_32bit, bitsandbytes' (deltatune.quant.bnb_adamw)."""
    groups = param_groups(model, cfg)
    kwargs = dict(lr=base_lr(model, cfg), betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name != "adamw":
        from ..core.config import ConfigError
        from ..quant import OptimizerUnavailableError, bnb_adamw

        try:
            return bnb_adamw(groups, bits=8 if cfg.name.endswith("8bit") else 32,
                             paged=cfg.name.startswith("paged"), **kwargs)
        except OptimizerUnavailableError as exc:  # no bitsandbytes; a paged optimizer off CUDA
            raise ConfigError(f"optim.name {cfg.name}: {exc}") from None
    if _fused_supported([p for g in groups for p in g["params"]]):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # e.g. torch < 2.4 has no fused kernel on CPU
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """optim.warmup_steps, or round(optim.warmup_ratio · total_steps) when warmup_steps is 0."""
    if cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)
    if warmup > total_steps:
        raise ValueError(f"optim.warmup_steps ({warmup}) exceeds the {total_steps} training steps (max_steps); lower it")
    return warmup


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """m(s), the factor on each group's lr at optimizer step s (0-based), as transformers' schedules define it.

    Warmup (s < W): m = s / W. Then with progress p = (s − W) / (total_steps − W), clipped to [0, 1], and
    floor f = optim.min_lr_ratio:
        cosine:   m = f + (1 − f) · ½(1 + cos(π p))      (Loshchilov & Hutter 2017, arXiv:1608.03983, no restarts)
        linear:   m = f + (1 − f) · (1 − p)
        constant: m = 1
    With f = 0 these equal transformers' get_{cosine,linear,constant}_schedule_with_warmup.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps (max_steps) must be positive, got {total_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine', 'linear' or 'constant', got {cfg.schedule!r}")
    warmup, floor, schedule = warmup_steps(cfg, total_steps), cfg.min_lr_ratio, cfg.schedule

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return multiplier


def method_lr_factors(model: nn.Module | None, total_steps: int) -> list[Callable[[int], float]]:
    """The `Method.lr_factor` of each trainable active adapter (ReLoRA's re-warmups after its restarts)."""
    if model is None:
        return []
    from ..core.registry import method_of

    configs = adapter_configs(model)
    return [method_of(configs[n]).lr_factor(configs[n], total_steps) for n in active_adapters(model)
            if method_of(configs[n]).lr_factor is not None and not configs[n].inference_mode]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    model: nn.Module | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_multiplier` times the adapter methods' lr factors (given `model`) to every group's
    `initial_lr`; call .step() after each optimizer step. The factors live inside the schedule, so the logged lr,
    a resumed run and every parameter group see them alike."""
    schedule, factors = lr_multiplier(cfg, total_steps), method_lr_factors(model, total_steps)
    if not factors:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: math.prod([schedule(s), *(f(s) for f in factors)]))
