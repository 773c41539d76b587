"""Text from YAML files and the command line, before the training config types it (`config.py`).

PyYAML reads `lr: 1e-3` as a string and the command line gives only strings: each value is converted here by
the type hint of the field it sets (`from_text`), so that `--optim.lr 1e-4`, `--data.packing yes` and
`--gradient_checkpointing selective` mean what the field means. `apply_overrides` puts dotted `--a.b value`
pairs into the nested mapping, still as text; `read_yaml` reads a file, every failure a ConfigError naming it.
"""
from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from ..core.config import ConfigError


class CliText(str):
    """A command-line value, not yet parsed: converted by the type of the field it sets (`from_text`)."""


NULL_WORDS = {"null", "none", "~"}
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def accepts(hint: Any, kind: type) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(accepts(a, kind) for a in typing.get_args(hint))
    return hint is kind


def yaml_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def from_text(value: Any, hint: Any, plain: bool = True) -> Any:
    """Text as the field's type: a CLI `CliText`, and with `plain` any string (PyYAML leaves `1e-3` one); other
    values are returned unchanged, for `_coerce` to check."""
    if isinstance(value, CliText):
        plain = True
        if value.strip().lower() in NULL_WORDS and accepts(hint, type(None)):
            return None
        if accepts(hint, str):
            return str(value)
        value = yaml_scalar(value)  # numbers, true/false, null, [lists], {mappings}
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        types_ = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(types_) == len(value):
            return [from_text(v, t, plain) for v, t in zip(value, types_)]
        return value
    if not plain or not isinstance(value, str) or accepts(hint, str):
        return value
    text = value.strip()
    if accepts(hint, bool) and text.lower() in BOOL_WORDS:
        return BOOL_WORDS[text.lower()]
    if accepts(hint, int) and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if accepts(hint, float):
        try:
            return float(text)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--a.b value` / `--a.b=value` pairs to a nested dict; the values stay text until `load_config`
    converts each to the type of its field."""
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
        node[leaf] = CliText(value)
        i += 1
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (UTF-8, a BOM allowed); every failure is a ConfigError naming the file."""
    import yaml

    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if loaded is not None and not isinstance(loaded, dict):  # e.g. a list or a bare string
        raise ConfigError(f"{path} must hold a mapping of config keys, found {type(loaded).__name__}")
    return loaded or {}
