"""The model a run trains, before the first step: seeds, precision, the model and tokenizer, the adapter,
and the frozen base prepared for training (bf16 frozen linears, gradient checkpointing). `loop.train` calls
these in this order; nothing here runs a step.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn

from ..core.config import AdapterConfig, ConfigError
from ..core.io import load_adapter
from ..core.model import attach
from ..core.registry import method_of
from ..models import default_compute_dtype
from ..quant import check_quantized_training, footprint, is_quantized_model, quantize_model
from .config import TrainConfig
from .distributed import World
from .memory import copy_out_of_file_mappings, selective_checkpointing_context, store_frozen_linears_in_bf16

ADAPTER_NAME = "default"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def main_print(world: World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def autocast_for(precision: str, world: World) -> Callable[[], ContextManager[Any]]:
    """bf16 autocast or plain fp32; "auto" picks bf16 only where the hardware computes it natively."""
    device = world.device.type
    if precision != "auto":
        use_bf16, reason = precision == "bf16", "set by the precision key"
    elif device == "cuda":
        use_bf16 = default_compute_dtype(device) == torch.bfloat16
        reason = f"this GPU {'supports' if use_bf16 else 'lacks'} bf16"
    else:
        use_bf16 = default_compute_dtype("cpu") == torch.bfloat16
        reason = f"this CPU {'has' if use_bf16 else 'lacks'} AVX512-BF16" + ("" if use_bf16 else "; bf16 would be emulated (slow)")
    main_print(world, f"precision: {'bf16 autocast' if use_bf16 else 'fp32'} ({reason})")
    return functools.partial(torch.autocast, device, dtype=torch.bfloat16, enabled=use_bf16)


def model_and_tokenizer(cfg: TrainConfig, model: nn.Module | None, tokenizer: Any, world: World,
                        autocast: functools.partial) -> tuple[nn.Module, Any]:
    compute_dtype = torch.bfloat16 if autocast.keywords["enabled"] else torch.float32  # of NF4 layers' matmuls
    if model is None:
        from ..models import load_model

        model, loaded_tokenizer = load_model(cfg.model, dtype=torch.float32, quantize=cfg.quantize,
                                             compute_dtype=compute_dtype)  # bf16 is autocast, weights stay fp32
        tokenizer = tokenizer or loaded_tokenizer
    elif cfg.quantize == "gguf" and not is_quantized_model(model):
        raise ConfigError("quantize: gguf loads the base's Q4_1 blocks from its GGUF file, so it cannot apply to a "
                          "model passed in; pass no model (set model:), or quantize: nf4")
    elif cfg.quantize and not is_quantized_model(model):
        quantize_model(model, compute_dtype=compute_dtype)
    elif tokenizer is None:
        raise ConfigError("train(model=...) also needs tokenizer=...: the data is tokenized with the model's tokenizer")
    return model.to(world.device), tokenizer  # no use_cache change needed: the loss runs with use_cache=False


def fitted_adapter_config(cfg: TrainConfig) -> AdapterConfig:
    """cfg.adapter's config with the run-length fields its method fills from max_steps (AdaLoRA's total_step),
    checked against max_steps (`Method.fit_run`); other methods' configs as they are."""
    config = cfg.adapter_config()
    fit = method_of(config).fit_run
    return fit(config, cfg.max_steps) if fit is not None else config


def attach_adapter(model: nn.Module, cfg: TrainConfig, config: AdapterConfig, world: World) -> None:
    """A new adapter from cfg.adapter, or the one in cfg.init_adapter, trainable (the adapter section is then unused)."""
    if cfg.init_adapter:
        load_adapter(model, cfg.init_adapter, ADAPTER_NAME, trainable=True)
        main_print(world, f"continuing to train adapter {cfg.init_adapter}")
    else:
        attach(model, config, ADAPTER_NAME)


def prepare_base(model: nn.Module, cfg: TrainConfig, autocast: functools.partial, world: World) -> None:
    """The frozen base in bf16 under bf16 autocast (frozen_bf16; NF4 layers stay as they are), and gradient
    checkpointing (memory mode: every layer, or selective), and the attention (`attention: per_example`)."""
    if is_quantized_model(model):
        check_quantized_training(model)
        main_print(world, f"quantized base: {footprint(model).summary()}")
    if cfg.frozen_bf16 and autocast.keywords["enabled"] and autocast.keywords["dtype"] == torch.bfloat16:
        count = store_frozen_linears_in_bf16(model)
        copy_out_of_file_mappings(model)
        main_print(world, f"frozen base: {count} linear weights stored in bf16 (frozen_bf16: false keeps fp32)")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, policy=cfg.gradient_checkpointing)
    if _attention_per_example(model, cfg):
        from .attention import register

        model.set_attn_implementation(register())


def _attention_per_example(model: nn.Module, cfg: TrainConfig) -> bool:
    """Whether the run computes attention per packed example (`attention`; auto: on packed rows of a
    transformers model on SDPA, on a CPU, where it is faster and rounds no worse)."""
    settable = callable(getattr(model, "set_attn_implementation", None))
    if cfg.attention == "per_example" and not settable:
        raise ConfigError(f"attention: per_example needs a transformers model, not {type(model).__name__}; "
                          "set attention: sdpa")
    if cfg.attention != "auto":
        return cfg.attention == "per_example"
    first = next(iter(model.parameters()), None)
    on_cpu = first is None or first.device.type == "cpu"
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return cfg.data.packing and settable and on_cpu and implementation == "sdpa"


def enable_gradient_checkpointing(model: nn.Module, *, policy: bool | str = True) -> None:
    """transformers' per-layer checkpointing, non-reentrant (it works although the frozen embeddings' outputs
    need no gradient). policy True: every layer recomputed; "selective": memory.py's policy, which keeps
    attention's and the wide matmuls' outputs; "narrow": the same without outputs wider than the hidden size
    (the MLP's gate and up projections)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = selective_checkpointing_context()
    elif policy == "narrow":
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ConfigError(f"gradient_checkpointing: narrow needs the model's config.hidden_size, which "
                              f"{type(model).__name__} lacks; use true or selective")
        kwargs["context_fn"] = selective_checkpointing_context(max_width=hidden)
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; set gradient_checkpointing: false")
