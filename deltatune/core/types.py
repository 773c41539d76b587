"""Values checked against type hints, for every config of deltatune (adapter configs and training configs).

Strict: text is never parsed here (YAML and command-line text is converted at that boundary, by the training
config); an int is accepted for a float, a list for a tuple. An error names the key and says what is allowed:

    lora_dropout must be a number, got '0.1'
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from .config import ConfigError


def _describe(hint: Any) -> str:
    """A type hint in words, for error messages: `str | None` -> "a string or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} numbers" if all(a in (int, float) for a in args) else f"a list of {len(args)} values"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    return "a mapping" if origin in (Mapping, dict) or hint in (dict, Mapping) else getattr(hint, "__name__", str(hint))


def coerce(key: str, value: Any, hint: Any, *, build: Callable[[type, Mapping[str, Any], str], Any] | None = None) -> Any:
    """`value` checked against a type hint, strictly (text is never parsed here); ints become floats for float
    fields, lists tuples, and a mapping for a dataclass hint goes to `build(cls, mapping, key)`. Errors are
    ConfigError naming the key and saying what is allowed."""
    try:
        return _checked(key, value, hint, build)
    except _WrongType:
        raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}") from None


class _WrongType(Exception):
    pass


def _checked(key: str, value: Any, hint: Any, build) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _checked(key, value, option, build)
            except _WrongType:
                continue
        raise _WrongType
    if hint is type(None):
        if value is None:
            return None
        raise _WrongType
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _WrongType
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping) and build is not None:
            return build(hint, value, key)
        raise _WrongType
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_checked(key, v, args[0], build) for v in value)
        if len(value) != len(args):
            raise _WrongType
        return tuple(_checked(key, v, t, build) for v, t in zip(value, args))
    if origin in (Mapping, dict) or hint in (dict, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
        raise _WrongType
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _WrongType
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _WrongType
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _WrongType
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise _WrongType
    return value  # a hint this checker does not model: the config class's own validation decides
