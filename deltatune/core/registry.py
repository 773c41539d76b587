"""The method registry: a method is named by its peft_type string and found from its config class.

A method is one file that calls `register` with what it is made of, any of:

    deltas     Delta classes placed on target modules (LoRA, IA3, a bottleneck adapter, added biases)
    inject     a model-level part the adapter owns (prompt tuning's virtual tokens): (model, config, name) ->
               `Injected` module, kept at `model.deltatune_parts[name]` and removed with the adapter
    select     existing parameters trained in place (BitFit's biases, full fine-tuning, LoRA's bias="all"):
               (model, config, target names) -> parameter names
    step_hook  a per-step training hook factory (see deltatune.train.hooks)
    readers    which tools read its adapter files (peft's own methods: "peft", "vLLM" for plain LoRA)
    resolve    (model, config) -> config with its model-dependent fields filled in at attach (prompt tuning's
               token_dim, as peft's _prepare_prompt_learning_config); the adapter keeps and saves the result

A *variant* of a method is chosen from its config (peft writes DoRA as a LoRA config with use_dora=true):
`register_variant("LORA", "use_dora", DoraLinear)` makes LoRA configs with that flag set use those deltas.
Registration never writes anything onto the classes it is given.

Later training-side contributions (an extra loss term, a learning-rate factor, a pass over data before
training, extra checkpoint state) become further optional fields here, read by the loop per adapter; methods
that do not set them are untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from .config import AdapterConfig, ConfigError
from .delta import Delta


class Injected(Protocol):
    """A model-level part of one adapter (an nn.Module): its file tensors, and how to take it out again."""

    def tensors(self) -> dict[str, torch.Tensor]: ...  # on-disk key (without peft's prefix) -> live tensor

    def remove(self, model: nn.Module) -> None: ...  # undo whatever the injector hooked into the model


Injector = Callable[[nn.Module, AdapterConfig, str], nn.Module]
Selector = Callable[[nn.Module, AdapterConfig, Sequence[str]], list[str]]
# (model, config, adapter name) -> an object with before_step/on_step (deltatune.train.hooks.StepHook), or None.
StepHookFactory = Callable[[nn.Module, AdapterConfig, str], Any]
Resolver = Callable[[nn.Module, AdapterConfig], AdapterConfig]


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type[AdapterConfig]
    deltas: tuple[type[Delta], ...] = ()
    inject: Injector | None = None
    select: Selector | None = None
    step_hook: StepHookFactory | None = None
    readers: tuple[str, ...] = ("deltatune",)
    variants: dict[str, tuple[type[Delta], ...]] = field(default_factory=dict)  # config flag -> deltas
    variant_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # config flag -> readers
    resolve: Resolver | None = None

    def delta_classes(self, config: AdapterConfig) -> tuple[type[Delta], ...]:
        flags = getattr(type(config), "variant_flags", ())
        missing = [flag for flag in flags if getattr(config, flag, False) and flag not in self.variants]
        if missing:
            raise ConfigError(f"{self.peft_type} with {missing[0]}=True needs that variant, and none is registered")
        flag = self._variant(config)
        return self.variants[flag] if flag else self.deltas

    def _variant(self, config: AdapterConfig) -> str | None:
        """The registered variant flag set in `config`, if any."""
        chosen = [flag for flag in self.variants if getattr(config, flag, False)]
        if len(chosen) > 1:
            raise ConfigError(f"{self.peft_type}: {' and '.join(chosen)} cannot be combined")
        return chosen[0] if chosen else None

    def readers_for(self, config: AdapterConfig) -> tuple[str, ...]:
        """The tools that read this config's files: a variant's own list where it has one (vLLM serves no DoRA)."""
        flag = self._variant(config)
        return self.variant_readers.get(flag, self.readers) if flag else self.readers

    def delta_for(self, module: nn.Module, config: AdapterConfig) -> type[Delta] | None:
        return next((cls for cls in self.delta_classes(config) if cls.supports(module)), None)


_METHODS: dict[str, Method] = {}


def register(
    config_cls: type[AdapterConfig],
    *deltas: type[Delta],
    inject: Injector | None = None,
    select: Selector | None = None,
    step_hook: StepHookFactory | None = None,
    readers: Sequence[str] = ("deltatune",),
    resolve: Resolver | None = None,
) -> Method:
    method = Method(config_cls.peft_type, config_cls, tuple(deltas), inject, select, step_hook, tuple(readers),
                    resolve=resolve)
    _METHODS[config_cls.peft_type] = method
    return method


def register_variant(peft_type: str, flag: str, *deltas: type[Delta], readers: Sequence[str] | None = None) -> None:
    """Configs of method `peft_type` with `flag` set use `deltas` instead of the method's own (and, if given,
    are read by `readers` rather than the method's)."""
    method = method_of(peft_type)
    if flag not in {f for f in method.config_cls.__dataclass_fields__}:
        raise ConfigError(f"{method.config_cls.__name__} has no field {flag!r} to choose a variant by")
    method.variants[flag] = tuple(deltas)
    if readers is not None:
        method.variant_readers[flag] = tuple(readers)


def method_of(config: AdapterConfig | str) -> Method:
    peft_type = config if isinstance(config, str) else config.peft_type
    if peft_type not in _METHODS:
        raise ConfigError(f"unknown method {peft_type!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[peft_type]


def registered_methods() -> dict[str, Method]:
    return dict(_METHODS)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """An adapter_config.json object to the registered method's config."""
    if "peft_type" not in data:
        raise ConfigError("adapter_config.json has no 'peft_type' key; is this a peft/deltatune adapter?")
    return method_of(str(data["peft_type"])).config_cls.from_dict(data)
