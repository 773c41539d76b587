"""Adapter configs: small, frozen, validated dataclasses whose fields are peft's `adapter_config.json` keys.

A method subclasses `AdapterConfig`, sets `peft_type`, adds its own fields and validates them in
`validate()`. The JSON written by `to_dict()` is what peft writes for the same method, so a file moves
between deltatune and peft unchanged (see `deltatune.core.io`).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

PEFT_VERSION_WRITTEN = "0.21.2"  # the peft release whose file layout we write; peft reads older and newer alike


class ConfigError(ValueError):
    """A config key or value that deltatune cannot accept; the message names the key."""


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, set)):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every method shares. Names and meanings follow peft's `PeftConfig`/`LoraConfig`.

    target_modules: which modules get the adapter. A string is a regular expression that must match the
        whole module name; a list matches a module whose name equals an entry or ends with `.entry`;
        `"all-linear"` selects every Linear/Conv1D except the output head. None means the
        architecture's usual default (for Llama: q_proj and v_proj).
    exclude_modules: the same forms as target_modules; a match here removes the module.
    layers_to_transform / layers_pattern: keep only modules inside these layer indices
        (the index that follows `layers_pattern`, by default one of layers/h/block/blocks/layer).
    modules_to_save: modules (exact name or suffix) trained as full copies, e.g. a classification head.
    """

    peft_type: ClassVar[str] = ""
    recommended_lr: ClassVar[float] = 2e-4  # the training loop's lr when optim.lr is not set
    # Keys peft writes for this method that deltatune does not model: accepted on load only at these values.
    peft_only_defaults: ClassVar[Mapping[str, Any]] = {}
    # model_type -> the targets used when target_modules is None (peft's per-architecture tables)
    default_target_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        from .types import coerce  # types.py raises ConfigError, defined here

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _as_tuple(getattr(self, f.name))
            object.__setattr__(self, f.name, coerce(f.name, value, hints[f.name]) if f.name in hints else value)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            _check_regex("target_modules", self.target_modules)
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = (layers,) if isinstance(layers, int) else layers
            if any(not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(f"layers_to_transform must be non-negative layer indices, got {self.layers_to_transform!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both, or neither")
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        self.validate()

    # Why this method cannot train under gradient checkpointing ("" = it can): the training config refuses the
    # pair before anything loads (prefix tuning: the checkpointed layers drop the cache that holds its prefix).
    gradient_checkpointing_problem: ClassVar[str] = ""

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError naming the field."""

    # ---- describing an adapter file (`deltatune inspect`) and checking it before anything is built --------
    # On-disk key endings after the adapted module's name that have more than one component (LoRA's
    # "lora_A.weight"); a key ending in none of them loses its last component ("...q_proj.ia3_l" -> q_proj).
    file_suffixes: ClassVar[tuple[str, ...]] = ()

    def adapted_modules(self, tensors: Mapping[str, Any]) -> list[str]:
        """The modules an adapter file's tensors belong to (keys without peft's `base_model.model.` prefix)."""
        def module(key: str) -> str:
            suffix = next((s for s in self.file_suffixes if key.endswith("." + s)), None)
            return key[: -len(suffix) - 1] if suffix else key.rpartition(".")[0]
        return sorted({module(k) for k in tensors})

    def describe(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """What `deltatune inspect` shows for this config and its file's tensors (keys without peft's prefix):
        label -> value, in order. The default gives the targets and the adapted modules; a method adds its own
        hyperparameters, variant or sizes with a few lines: `return {"variant": ..., **super().describe(t)}`."""
        modules = self.adapted_modules(tensors)
        targets = self.target_modules
        if targets is None:  # the architecture's default: name what the file holds
            found = sorted({m.rpartition(".")[2] for m in modules})
            targets = f"{', '.join(found) or '-'} (the architecture's default)"
        return {
            "targets": ", ".join(targets) if isinstance(targets, tuple) else targets,
            "modules": f"{len(modules)} adapted (e.g. {modules[0] if modules else '-'})",
        }

    def readers(self, method_readers: tuple[str, ...]) -> tuple[str, ...]:
        """The tools that read this config's files correctly, given its method's list: a config may narrow it
        (LoRA's LoftQ/QPiSSA starts need the 4-bit base they were trained on, which only deltatune rebuilds)."""
        return method_readers

    def check_file(self, tensors: Mapping[str, Any]) -> str:
        """A reason to refuse an adapter file's tensors (keys without peft's prefix) before anything is
        allocated ("" if none): sizes the config implies that the file's shapes contradict (prompt tuning's
        num_virtual_tokens against its prompt's rows). Shapes are checked against the model after that."""
        return ""

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    # ---- peft's adapter_config.json ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object peft writes for this config (lists, not tuples; peft-only keys at their defaults)."""
        out: dict[str, Any] = {"peft_type": self.peft_type, "peft_version": PEFT_VERSION_WRITTEN, "auto_mapping": None}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        for key, value in self.peft_only_defaults.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterConfig":
        """Build from an adapter_config.json object; unknown keys and unsupported peft features are errors."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(f"peft_type is {peft_type!r}, but {cls.__name__} reads {cls.peft_type!r} files")
        for key in ("peft_version", "auto_mapping"):
            data.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unsupported = []
        for key in list(data):
            if key in known:
                continue
            if key in cls.peft_only_defaults:
                value = data.pop(key)
                if value != cls.peft_only_defaults[key] and value not in (None, {}, []):
                    unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise ConfigError(
                f"this {cls.peft_type} adapter uses peft features deltatune does not support: {', '.join(unsupported)}"
            )
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        return cls(**data)


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None


def pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", module_name):  # grouped, so "q_proj|v_proj" works as in peft
            return value
    return default


def check_range(name: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["AdapterConfig", "ConfigError", "pattern_value", "check_range", "check_positive_int"]
