"""The training config: one typed, frozen tree, read from YAML plus dotted command-line overrides.

    deltatune train run.yaml --optim.lr 1e-4 --data.max_length 256

Unknown keys and values of the wrong type are errors that name the key (`optim.lrr`, `batch_size`).
The `adapter` section is the method's own config (peft's adapter_config.json keys plus `peft_type`), so
every method's validation applies unchanged.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ..core.config import AdapterConfig, ConfigError
from ..core.registry import config_from_dict


@dataclass(frozen=True)
class DataConfig:
    """train/eval: JSONL, JSON or Parquet files with `messages`, `prompt`+`completion`, or `text` rows."""

    train: str | None = None
    eval: str | None = None
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    max_length: int = 512
    overlong: Literal["truncate", "skip"] = "truncate"
    packing: bool = False  # concatenate short examples into full rows (no attention across examples)
    group_by_length: bool = True  # batch examples of similar length together (less padding)
    eval_fraction: float = 0.0  # hold out this share of train when no eval file is given


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    loraplus_lr_ratio: float | None = None  # LoRA+: lr of B matrices = ratio x lr (Hayou et al. 2024 suggest 16)


@dataclass(frozen=True)
class TrainConfig:
    model: str | None = None  # local transformers dir or hub id; None = the embedded SmolLM2
    adapter: Mapping[str, Any] = field(
        default_factory=lambda: {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    )
    init_adapter: str | None = None  # continue training this adapter (e.g. continued pretraining -> SFT)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 4  # examples per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the CPU/GPU supports it
    gradient_checkpointing: bool = False  # memory mode: recompute each layer in the backward instead of storing it
    frozen_bf16: bool = True  # under bf16 autocast, store the frozen linear weights in bf16 (same products; also
    # in a model passed to train(model=...))
    loss_chunk_size: int = 0  # tokens per cross-entropy chunk (never all fp32 logits at once); 0 = by vocabulary size
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    log_every: int = 1
    resume: bool = False  # continue from the newest checkpoint in output_dir
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("save_every", "eval_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be 0 (off) or a positive number of steps, got {getattr(self, key)}")
        if self.loss_chunk_size < 0:
            raise ConfigError(f"loss_chunk_size must be 0 (automatic) or a number of tokens, got {self.loss_chunk_size}")
        if self.data.max_length <= 1:
            raise ConfigError(f"data.max_length must be at least 2 tokens, got {self.data.max_length}")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.data.eval_fraction}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.optim.loraplus_lr_ratio is not None and self.optim.loraplus_lr_ratio < 1:
            raise ConfigError(f"optim.loraplus_lr_ratio should be >= 1 (the paper suggests 16), got {self.optim.loraplus_lr_ratio}")

    def adapter_config(self) -> AdapterConfig:
        data = dict(self.adapter)
        data.setdefault("peft_type", "LORA")
        try:
            return config_from_dict(data)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"adapter: {exc}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """value checked (and, for CLI strings, converted) against a type hint; errors name the key."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}")
        return _build(hint, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{key} must be a list of {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(_coerce(key, v, t) for v, t in zip(value, typing.get_args(hint)))
    if origin in (Mapping, dict) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)}; "
            f"known keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}"
        )
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--a.b value` / `--a.b=value` pairs (values parsed as YAML scalars) to a nested dict."""
    items = list(overrides)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected an option like --optim.lr 1e-4, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"option --{key} needs a value")
            value, i = items[i + 1], i + 1
        node = data
        *parents, leaf = key.replace("-", "_").split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a section")
        node[leaf] = _parse_scalar(value)
        i += 1
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **values: Any) -> TrainConfig:
    """TrainConfig from a YAML file (optional), then keyword values, then dotted CLI overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):  # e.g. a list or a bare string
            raise ConfigError(f"{path} must hold a mapping of config keys, found {type(loaded).__name__}")
        data = loaded or {}
    for key, value in values.items():
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and isinstance(data.get(key), dict) and key != "adapter":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data.setdefault("adapter", dict(TrainConfig().adapter))  # `--adapter.r 8` edits the default adapter
    config = _build(TrainConfig, apply_overrides(data, overrides))
    config.adapter_config()  # validate the adapter section now, naming its keys
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
