"""The training config: one typed, frozen tree, read from YAML plus dotted command-line overrides.

    deltatune train run.yaml --optim.lr 1e-4 --data.max_length 256

Unknown keys, values of the wrong type and values out of range are ConfigErrors that name the key
(`optim.lrr`, `batch_size`), raised when the config is built, before anything runs. Text from YAML and the
command line is converted to the field's type at that boundary (PyYAML reads `lr: 1e-3` as a string);
Python callers get no conversion: `TrainConfig(batch_size="4")` is an error naming `batch_size`.
The `adapter` section is the method's own config (peft's adapter_config.json keys plus `peft_type`), so
every method's validation applies unchanged; its values are type-checked against that config's fields.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

from ..core.config import AdapterConfig, ConfigError
from ..core.types import coerce
from ..core.registry import config_from_dict
from .config_text import CliText, apply_overrides, from_text, read_yaml, yaml_scalar  # noqa: F401 (apply_overrides: public here)


class _Section:
    """Shared by the config dataclasses: every field type-checked (strictly) and range-checked on construction."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(self._prefix + f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Raise ConfigError naming the first value out of its range."""


@dataclass(frozen=True)
class DataConfig(_Section):
    """train/eval: JSONL, JSON or Parquet files with `messages`, `prompt`+`completion`, or `text` rows."""

    _prefix: ClassVar[str] = "data."
    train: str | None = None
    eval: str | None = None
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    max_length: int = 512
    overlong: Literal["truncate", "skip"] = "truncate"
    packing: bool = False  # concatenate short examples into full rows (no attention across examples)
    group_by_length: bool = True  # batch examples of similar length together (less padding)
    eval_fraction: float = 0.0  # hold out this share of train when no eval file is given

    def _check_ranges(self) -> None:
        _not_empty("data.train", self.train)
        _not_empty("data.eval", self.eval)
        _at_least("data.max_length", self.max_length, 2, "tokens")
        _in_range("data.eval_fraction", self.eval_fraction, 0.0, 1.0)
        if self.eval and self.eval_fraction:
            raise ConfigError("data.eval and data.eval_fraction are both set; choose one (an eval file, or a share "
                              "of data.train held out)")


@dataclass(frozen=True)
class OptimConfig(_Section):
    _prefix: ClassVar[str] = "optim."
    lr: float | None = None  # None: the adapter method's recommended lr (LoRA 2e-4, IA3 3e-3, prompt tuning 3e-2, ...)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    loraplus_lr_ratio: float | None = None  # LoRA+: lr of B matrices = ratio x lr (Hayou et al. 2024 suggest 16)
    # adamw: torch's; adamw_8bit: bitsandbytes' 8-bit blockwise states (Dettmers et al. 2022), 1/4 of the state
    # memory; paged_*: states in CUDA unified memory (QLoRA §3), CUDA only. Names as transformers' `optim`.
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"

    def _check_ranges(self) -> None:
        if self.lr is not None:
            _positive("optim.lr", self.lr)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        for i, beta in enumerate(self.betas):
            _in_range(f"optim.betas[{i}]", beta, 0.0, 1.0)
        _positive("optim.eps", self.eps)
        _at_least("optim.max_grad_norm", self.max_grad_norm, 0.0, "(0 turns clipping off)")
        _at_least("optim.warmup_steps", self.warmup_steps, 0, "steps")
        _in_range("optim.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("optim.warmup_steps and optim.warmup_ratio are both set; choose one")
        _in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, high_open=False)
        if self.loraplus_lr_ratio is not None:
            _at_least("optim.loraplus_lr_ratio", self.loraplus_lr_ratio, 1.0, "(the paper suggests 16)")


@dataclass(frozen=True)
class TrainConfig(_Section):
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
    # memory mode: true recomputes each decoder layer in the backward instead of storing its activations;
    # "selective" stores the outputs of attention and of the wide matmuls and recomputes only the cheap rest
    # (norms, rotary, SiLU, adds, casts, LoRA's rank-r product; train/memory.py); "narrow" as selective but
    # recomputes the MLP's gate/up projections too (outputs wider than the hidden size). Same gradients always.
    gradient_checkpointing: bool | Literal["selective", "narrow"] = False
    frozen_bf16: bool = True  # under bf16 autocast, store the frozen linear weights in bf16 (same products; also
    # in a model passed to train(model=...))
    # "per_example": on packed rows on a CPU, attention over each packed example's own causal block
    # (deltatune.train.attention) instead of SDPA over the masked row: faster there, exact in fp32, and in bf16
    # closer to exact attention than SDPA's bf16 kernel (docs/benchmarks.md); anything else (padded rows, CUDA,
    # fp16) runs SDPA as "sdpa" does. "auto": per_example where data.packing is on, the model a transformers
    # one on SDPA and on a CPU; "sdpa": the model's attention left as it is
    attention: Literal["auto", "sdpa", "per_example"] = "auto"
    quantize: Literal["nf4", "gguf"] | None = None  # QLoRA: the base's linear layers stored in NF4 + double quantization
    # (~4.13 bits/weight), the adapter trained on top (docs/qlora.md); also applied to a model passed in; gguf: the
    # embedded model's own Q4_1 blocks (lossless, ~5 bits/weight; loaded from the file, not from a model passed in)
    loss_chunk_size: int = 0  # tokens per cross-entropy chunk (never all fp32 logits at once); 0 = by vocabulary size
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    log_every: int = 1
    resume: bool = False  # continue from the newest checkpoint in output_dir
    tensorboard: bool = False

    def _check_ranges(self) -> None:
        for key in ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every"):
            _at_least(key, getattr(self, key), 1)
        for key in ("save_every", "eval_every"):
            _at_least(key, getattr(self, key), 0, "(0 = off, else a number of steps)")
        _at_least("loss_chunk_size", self.loss_chunk_size, 0, "(0 = automatic, else a number of tokens)")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        _not_empty("model", self.model)
        _not_empty("init_adapter", self.init_adapter)
        _not_empty("output_dir", self.output_dir)
        if self.optim.warmup_steps > self.max_steps or round(self.optim.warmup_ratio * self.max_steps) > self.max_steps:
            raise ConfigError(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds max_steps ({self.max_steps}); "
                              "lower it so the warmup fits the run")
        adapter = self.adapter_config()  # the method's own checks, naming its keys
        if self.gradient_checkpointing and type(adapter).gradient_checkpointing_problem:
            raise ConfigError(f"gradient_checkpointing: {type(adapter).gradient_checkpointing_problem}")
        if self.optim.lr is None:  # each method trains at its own recommended lr unless one is given
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, lr=type(adapter).recommended_lr))

    def adapter_config(self) -> AdapterConfig:
        data = dict(self.adapter)
        data.setdefault("peft_type", "LORA")
        data = _adapter_types(data, text=False)
        try:
            return config_from_dict(data)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"adapter: {exc}") from None


# ---- checks ---------------------------------------------------------------------------------------------
def _at_least(key: str, value: float, low: float, unit: str = "") -> None:
    if not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{key} must be {'positive' if low == 1 and isinstance(value, int) else f'>= {low}'}"
                          f"{' ' + unit if unit else ''}, got {value}")


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a finite number > 0, got {value}")


def _in_range(key: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    if not (low <= value < high if high_open else low <= value <= high):  # False for NaN
        raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def _not_empty(key: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{key} is an empty string; give a path{' or null' if key != 'output_dir' else ''}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` checked against a type hint (deltatune.core.types); a mapping for a section builds that section."""
    return coerce(key, value, hint, build=lambda cls, data, k: _build(cls, data, prefix=f"{k}."))


# Hugging Face Trainer / TRL spellings people type, and deltatune's key for each (suggested, never applied).
HF_KEYS = {
    "learning_rate": "optim.lr", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "lr_scheduler_type": "optim.schedule", "warmup_steps": "optim.warmup_steps", "warmup_ratio": "optim.warmup_ratio",
    "max_grad_norm": "optim.max_grad_norm", "optim": "optim.name", "adam_beta1": "optim.betas", "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "max_steps (optimizer steps: epochs x examples "
    "/ (batch_size x grad_accum))", "epochs": "max_steps (optimizer steps)", "save_steps": "save_every",
    "eval_steps": "eval_every", "logging_steps": "log_every", "save_total_limit": "keep_last",
    "resume_from_checkpoint": "resume", "bf16": "precision: bf16", "fp16": "precision (bf16 or fp32)",
    "max_seq_length": "data.max_length", "max_length": "data.max_length", "dataset": "data.train",
    "train_file": "data.train", "model_name_or_path": "model", "peft_type": "adapter.peft_type",
    "r": "adapter.r", "lora_r": "adapter.r", "lora_alpha": "adapter.lora_alpha", "lora_dropout": "adapter.lora_dropout",
    "target_modules": "adapter.target_modules",
}


def _suggestion(key: str, prefix: str, names: set[str]) -> str:
    """' (deltatune's key: optim.lr)' for a Hugging Face spelling, ' (did you mean max_steps?)' for a typo."""
    import difflib

    if key in HF_KEYS:
        return f" (deltatune's key: {HF_KEYS[key]})"
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k + _suggestion(k, prefix, names) for k in unknown)}; "
            f"known keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}"
        )
    try:
        return cls(**data)
    except TypeError as exc:  # a class without _Section's checks (the adapter's own config is checked elsewhere)
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


# ---- text from YAML and the command line, converted by each field's type (config_text.py) -------------
def _section_from_text(cls: type, data: Any, plain: bool) -> Any:
    """`from_text` over every known key of a (nested) config mapping; unknown keys are left for `_build` to name.
    `plain`: convert every string (a YAML file), else only command-line text (Python values stay as given)."""
    if not isinstance(data, Mapping):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        if key not in hints or key.startswith("_"):
            continue
        hint = hints[key]
        if key == "adapter" and cls is TrainConfig:
            out[key] = _adapter_types(value, text=True, plain=plain) if isinstance(value, Mapping) else from_text(value, hint)
        elif dataclasses.is_dataclass(hint):
            value = yaml_scalar(value) if isinstance(value, CliText) else value
            out[key] = _section_from_text(hint, value, plain)
        else:
            out[key] = from_text(value, hint, plain)
    return out


def _adapter_types(data: Mapping[str, Any], *, text: bool, plain: bool = False) -> dict[str, Any]:
    """The adapter section checked against its method's config fields (text converted first when `text`)."""
    data = dict(data)
    peft_type = data.get("peft_type", "LORA")
    if isinstance(peft_type, CliText):
        data["peft_type"] = peft_type = str(peft_type)
    from ..core.registry import registered_methods

    spelled = str(peft_type).strip().upper().replace("-", "_")  # `--adapter.peft_type lora`; files keep LORA
    if str(peft_type) not in registered_methods() and spelled in registered_methods():
        data["peft_type"] = peft_type = spelled
    try:
        cls = registered_methods()[str(peft_type)].config_cls
        hints = typing.get_type_hints(cls)
    except Exception:  # unknown method: config_from_dict names it
        return {k: str(v) if isinstance(v, CliText) else v for k, v in data.items()}
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in fields:
            value = from_text(value, hints[key], plain) if text else value
            data[key] = _coerce(f"adapter.{key}", value, hints[key])
        elif isinstance(value, CliText):
            data[key] = yaml_scalar(value)
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **values: Any) -> TrainConfig:
    """TrainConfig from a YAML file (optional), then keyword values, then dotted CLI overrides.

    Strings in the file and the overrides are converted to each field's type; keyword values are not."""
    data: dict[str, Any] = _section_from_text(TrainConfig, read_yaml(path), plain=True) if path is not None else {}
    for key, value in values.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and isinstance(data.get(key), dict) and key != "adapter":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    default_adapter = "adapter" not in data
    data.setdefault("adapter", {})
    if overrides:
        data = _section_from_text(TrainConfig, apply_overrides(data, overrides), plain=False)
    if default_adapter and data["adapter"].get("peft_type", "LORA") == "LORA":  # `--adapter.r 8` edits the default
        data["adapter"] = {**TrainConfig().adapter, **data["adapter"]}  # LoRA; another peft_type starts from its own
    return _build(TrainConfig, data)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
