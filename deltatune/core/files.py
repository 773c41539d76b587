"""An adapter directory on disk, with no model involved: its file names and metadata keys, reading it into
(config, tensors, metadata) with every problem raised as `AdapterFileError`, the checks on its values, and the
`DIR@key=value` overrides written after its path.

`core/io.py` moves adapters between a model and these files (save, load, fill); it is the one owner of the
format, and this module is the half of it that reads and validates a directory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ConfigError
from .registry import config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
SAVED_AS_KEY = "deltatune_saved_as"  # safetensors metadata: what a save-only view wrote (Method.save_view)
BASE_QUANTIZATION_KEY = "deltatune_base_quantization"  # safetensors metadata: e.g. "nf4-dq" for a QLoRA adapter
BASE_SOURCE_KEY = "deltatune_base_source"  # safetensors metadata: JSON, the embedded base's exact source (models.py)
LARGEST_VALUE = 1e16  # |x| beyond this in an adapter file is refused like NaN/Inf: a product of two overflows fp32


class AdapterFileError(ValueError):
    """An adapter directory that cannot be read or does not fit the model; nothing was changed."""


def read_adapter(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[Any, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, metadata) of an adapter directory, validated but not applied to any model."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterFileError(f"{root} is not a directory; an adapter is a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{root} has no {CONFIG_NAME}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{config_path} is not valid JSON ({exc}); the file is truncated or corrupted") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object, found {type(data).__name__}")
    try:
        config = config_from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise AdapterFileError(f"{config_path}: {exc}") from None
    tensors, metadata = _read_tensors(root, allow_pickle)
    return config, tensors, metadata


def _read_tensors(root: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    weights = root / WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(f"{weights} cannot be read ({exc}); the file is truncated or corrupted") from None
    pickled = root / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{root} holds only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code when loaded. Refused; "
                "pass allow_pickle=True (CLI: --allow-pickle) if you trust it (it is then read with weights_only=True), "
                "or convert it to safetensors"
            )
        try:
            tensors = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise AdapterFileError(f"{pickled} cannot be read ({exc})") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise AdapterFileError(f"{pickled} holds a {type(tensors).__name__}, not a mapping of tensor names to tensors")
        return tensors, {}
    raise AdapterFileError(f"{root} has {CONFIG_NAME} but no {WEIGHTS_NAME}")


def saved_as(path: str | os.PathLike) -> str:
    """The note a save-only view left in an adapter file ("" for a file that is the live state)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as f:
        return (f.metadata() or {}).get(SAVED_AS_KEY, "")


def base_source(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The exact base an adapter file was trained on, as its metadata records it (None when not recorded)."""
    try:
        return json.loads(metadata[BASE_SOURCE_KEY]) if BASE_SOURCE_KEY in metadata else None
    except ValueError:
        return None


def split_adapter_spec(spec: str | os.PathLike) -> tuple[str | os.PathLike, dict[str, Any]]:
    """`DIR@key=value,key=value` -> (DIR, {key: value}): config overrides written after an adapter's path, as the
    CLI and `serve` take them (`runs/dy/adapter@rank=4`). Values read as JSON (4, 0.5, true, null), else as text.
    A path that exists as given, or holds no `@`, is returned unchanged with no overrides."""
    text = os.fspath(spec)
    if not isinstance(spec, str) or "@" not in text or Path(text).exists():
        return spec, {}
    head, _, tail = text.rpartition("@")
    overrides: dict[str, Any] = {}
    for item in tail.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise AdapterFileError(f"{text!r}: after '@' come overrides KEY=VALUE[,KEY=VALUE] (e.g. {head}@rank=4), "
                                   f"got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return head, overrides


def with_overrides(config: Any, overrides: Mapping[str, Any], path: Any = "") -> Any:
    """`config` with `overrides` applied and validated; an unknown field or a bad value names the field."""
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    where = f"overrides for {path}" if path else "overrides"
    if unknown:
        raise AdapterFileError(f"{where}: {unknown[0]!r} is not a field of {type(config).__name__} "
                               f"({config.peft_type}); its fields are {', '.join(sorted(fields))}")
    try:
        return config.replace(**overrides)
    except (ConfigError, TypeError) as exc:
        raise AdapterFileError(f"{where}: {exc}") from None


def value_problem(tensors: Mapping[str, torch.Tensor]) -> str:
    """What is wrong with the values of an adapter file's tensors ("" if nothing): NaN/Inf, or magnitudes no
    trained adapter holds (beyond LARGEST_VALUE, e.g. 3e38: finite, but they overflow in the first product)."""
    extremes = {k: torch.aminmax(t.detach()) for k, t in tensors.items() if t.is_floating_point() and t.numel()}
    magnitude = {k: max(-float(lo), float(hi)) for k, (lo, hi) in extremes.items()}  # one pass, no copy; NaN stays NaN
    bad = [k for k, m in magnitude.items() if not math.isfinite(m)]
    if bad:
        return f"{len(bad)} tensors hold NaN/Inf (first: {bad[0]}); the run that wrote it diverged"
    huge = {k: m for k, m in magnitude.items() if m > LARGEST_VALUE}
    if huge:
        first = next(iter(huge))
        return (f"{len(huge)} tensors hold values beyond ±{LARGEST_VALUE:.0e} (first: {first}, |x| up to "
                f"{huge[first]:.1e}); no trained adapter holds these and they overflow in use")
    return ""
