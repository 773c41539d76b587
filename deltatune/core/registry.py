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
    shared     a model-level part built before the deltas, seeing every target: (model, config, name, targets)
               -> `Injected` module, kept as `inject`'s is and handed to each delta as `Target.part` (VeRA's
               frozen projections, sized to the largest targeted shape); a part holding no parameters (only
               frozen buffers) does not stop merge_and_unload

Training-side contributions, read by the loop per trainable adapter (methods that do not set them are untouched):

    loss_term  (model, config, name) -> a scalar tensor added to the step's objective, task mean + term, once
               per optimizer step (it depends on the parameters, not the batch: AdaLoRA's γ·R orthogonality
               penalty); logged apart from the task loss as `aux_loss`
    lr_factor  (config, total_steps) -> f(s), a factor on every group's lr at optimizer step s (0-based),
               multiplied into the schedule inside the scheduler (ReLoRA's re-warmups after each restart)
    fit_run    (config, max_steps) -> config with its run-length fields filled (AdaLoRA's total_step) and
               checked, applied before attach; such a method's max_steps cannot change on resume
    save_view  (model, adapter, tensors) -> SavedView: what the adapter file holds when it differs from the
               live tensors (AdaLoRA's pruned ranks; ReLoRA's whole change as one LoRA); checkpoints keep the
               live tensors as well, so a run resumes from exactly what it trained
    check_update  (model, adapter, new config) -> None: validates a config change after attach
               (`deltatune.update_config`; AdaLoRA's rank_pattern), raising ConfigError naming the field
    prepass    (model, config, name, PrepassData) -> None: a pass over the training data before training, on
               the frozen base in the run's precision, summed over processes (FishMask's and Child-tuning_D's
               Fisher; EVA's activations); see deltatune.train.prepass

A *variant* of a method is chosen from its config (peft writes DoRA as a LoRA config with use_dora=true):
`register_variant("LORA", "use_dora", DoraLinear)` makes LoRA configs with that flag set use those deltas.
Registration never writes anything onto the classes it is given.

Parameters an adapter owns and saves but does not train (ReLoRA's accumulated merged delta) are a delta's
persistent buffers: they are in `tensors()` (file, checkpoint, load) but never in `parameters()`, and a
disabled or deleted adapter's site skips or drops them with the delta, so the base comes back exactly.
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
LossTerm = Callable[[nn.Module, AdapterConfig, str], torch.Tensor]
LrFactor = Callable[[AdapterConfig, int], Callable[[int], float]]
RunFitter = Callable[[AdapterConfig, int], AdapterConfig]
UpdateCheck = Callable[[nn.Module, Any, AdapterConfig], None]  # (model, Adapter, new config)
SharedPart = Callable[[nn.Module, AdapterConfig, str, Sequence[Any]], nn.Module]  # (model, config, name, [Target])
Prepass = Callable[[nn.Module, AdapterConfig, str, Any], None]  # (model, config, name, train.prepass.PrepassData)


@dataclass(frozen=True)
class SavedView:
    """What an adapter file holds when it is not the live state: the config and tensors (on-disk keys without
    peft's prefix) to write, and one line saying what was written (shown by the training loop, kept in the
    file's metadata as `deltatune_saved_as`)."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    note: str = ""


# (model, Adapter, live tensors keyed as on disk without peft's prefix) -> SavedView
SaveView = Callable[[nn.Module, Any, dict[str, torch.Tensor]], SavedView]


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
    loss_term: LossTerm | None = None
    lr_factor: LrFactor | None = None
    fit_run: RunFitter | None = None
    save_view: SaveView | None = None
    check_update: UpdateCheck | None = None
    shared: SharedPart | None = None
    prepass: Prepass | None = None

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
        """The tools that read this config's files: a variant's own list where it has one (vLLM serves no DoRA),
        narrowed by the config itself (`AdapterConfig.readers`)."""
        flag = self._variant(config)
        return config.readers(self.variant_readers.get(flag, self.readers) if flag else self.readers)

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
    loss_term: LossTerm | None = None,
    lr_factor: LrFactor | None = None,
    fit_run: RunFitter | None = None,
    save_view: SaveView | None = None,
    check_update: UpdateCheck | None = None,
    shared: SharedPart | None = None,
    prepass: Prepass | None = None,
) -> Method:
    method = Method(config_cls.peft_type, config_cls, tuple(deltas), inject, select, step_hook, tuple(readers),
                    resolve=resolve, loss_term=loss_term, lr_factor=lr_factor, fit_run=fit_run,
                    save_view=save_view, check_update=check_update, shared=shared, prepass=prepass)
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
