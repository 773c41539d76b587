"""The method registry: a method is named by its peft_type string and found from its config class.

A method registers its config class and the layer classes that wrap supported modules; `attach` then needs
nothing method-specific. A method that does not wrap layers (prompt tuning, say) registers an `inject`
function instead, and the generic layer replacement is skipped. A method that acts during training
(AdaLoRA's rank budget, ReLoRA's resets, DyLoRA's rank sampling, Child-tuning's gradient masks) registers a
`step_hook` factory; the training loop calls it once per trainable adapter (see `deltatune.train.hooks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from torch import nn

from .config import AdapterConfig, ConfigError
from .layer import AdapterLayer


class Injector(Protocol):
    def __call__(self, model: nn.Module, config: AdapterConfig, name: str) -> None: ...


# (model, config, adapter name) -> an object with before_step/on_step (deltatune.train.hooks.StepHook), or None.
StepHookFactory = Callable[[nn.Module, AdapterConfig, str], Any]


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type[AdapterConfig]
    layer_classes: tuple[type[AdapterLayer], ...] = ()
    inject: Injector | None = None
    step_hook: StepHookFactory | None = None  # per-step training hook; None for methods that need none

    def layer_for(self, module: nn.Module) -> type[AdapterLayer] | None:
        return next((cls for cls in self.layer_classes if cls.supports(module)), None)


_METHODS: dict[str, Method] = {}


def register(
    config_cls: type[AdapterConfig],
    *layer_classes: type[AdapterLayer],
    inject: Injector | None = None,
    step_hook: StepHookFactory | None = None,
) -> Method:
    method = Method(config_cls.peft_type, config_cls, tuple(layer_classes), inject, step_hook)
    _METHODS[config_cls.peft_type] = method
    for cls in layer_classes:
        cls.peft_type = config_cls.peft_type
    return method


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

