"""Which modules of a model get an adapter: peft's matching rules, on any `nn.Module`.

- a string target is a regular expression matched against the whole module name;
- a list target matches a module whose name equals an entry or ends with `.entry`;
- `"all-linear"` is every Linear / GPT-2 Conv1D except the output head;
- `layers_to_transform` keeps modules whose layer index (after `layers_pattern`) is listed;
- `exclude_modules` (same forms as targets) removes matches.
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable

from torch import nn

from .config import AdapterConfig, ConfigError

try:  # GPT-2 style linear with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the core works without it
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")
PEFT_CLASSIFIER_HEADS = ("classifier", "score")  # what peft adds to modules_to_save for SEQ_CLS / TOKEN_CLS

class TargetNotFoundError(ValueError):
    """No module matched the config's targets; the message lists the closest names."""


def _matches(name: str, spec: str | tuple[str, ...]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _layer_index(name: str, patterns: str | tuple[str, ...] | None) -> int | None:
    patterns = DEFAULT_LAYER_PATTERNS if patterns is None else ((patterns,) if isinstance(patterns, str) else patterns)
    for pattern in patterns:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", "." + name)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head), which `all-linear` never touches."""
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def default_targets(model: nn.Module, config: AdapterConfig) -> tuple[str, ...]:
    """The method's usual targets for this architecture (`default_target_modules` of its config class)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = type(config).default_target_modules
    if model_type not in table:
        raise ConfigError(
            f"target_modules is not set and {config.peft_type} has no default for model type {model_type!r}; "
            "set target_modules, e.g. target_modules='all-linear' or ['q_proj', 'v_proj']"
        )
    return table[model_type]


def find_targets(
    model: nn.Module,
    config: AdapterConfig,
    supports: Callable[[nn.Module], bool],
    candidates: Iterable[tuple[str, nn.Module]] | None = None,
) -> list[str]:
    """Module names the config selects, in model order. Raises TargetNotFoundError when there are none.

    `candidates` are (name, module) pairs to choose from (default: every named module); the core passes the
    modules' logical names, so an existing adapter site is matched by the name of the module it wraps.
    """
    spec = config.target_modules if config.target_modules is not None else default_targets(model, config)
    heads = output_head_names(model) if spec == "all-linear" else set()
    layers = config.layers_to_transform
    layers = (layers,) if isinstance(layers, int) else layers
    found: list[str] = []
    for name, module in model.named_modules() if candidates is None else candidates:
        if not name:
            continue
        if spec == "all-linear":
            base = getattr(module, "base_layer", module)  # an existing adapter layer counts as its base
            if not (isinstance(base, LINEAR_TYPES) or getattr(base, "quantized", False)) or name in heads or name.split(".")[-1] in heads:
                continue
        elif not _matches(name, spec):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if config.modules_to_save and any(f".{m}." in f".{name}." for m in config.modules_to_save):
            continue  # as in peft: a module trained in full (or inside one) never also gets an adapter
        if layers is not None and _layer_index(name, config.layers_pattern) not in layers:
            continue
        if not supports(module):
            if spec == "all-linear":
                continue
            raise TargetNotFoundError(
                f"module {name!r} ({type(module).__name__}) matches target_modules but "
                f"{config.peft_type} cannot be applied to it"
            )
        found.append(name)
    if not found:
        raise TargetNotFoundError(_nothing_matched(model, spec, config))
    return found


def _nothing_matched(model: nn.Module, spec: object, config: AdapterConfig) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.split(".")[-1] for n in names if not n.split(".")[-1].isdigit()})
    wanted: Iterable[str] = [spec] if isinstance(spec, str) else spec  # type: ignore[assignment]
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w.split(".")[-1], leaves, n=3, cutoff=0.4)
        close += difflib.get_close_matches(w, names, n=2, cutoff=0.6)
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" within layers {config.layers_to_transform!r}"
    if config.modules_to_save:
        extra += f" outside modules_to_save={list(config.modules_to_save)!r}"
    hint = f" Closest module names: {', '.join(dict.fromkeys(close))}." if close else ""
    return (
        f"target_modules={spec!r} matched no module{extra} of {type(model).__name__}.{hint} "
        f"Module name endings in this model: {', '.join(leaves[:25])}{' ...' if len(leaves) > 25 else ''}"
    )


def find_modules_to_save(model: nn.Module, wanted: tuple[str, ...]) -> list[str]:
    found = [n for n, _ in model.named_modules() if n and _matches(n, wanted)]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in found)]
    if found:  # peft writes both usual head names (["classifier", "score"]) for classifiers; a model has one of them
        missing = [w for w in missing if w not in PEFT_CLASSIFIER_HEADS]
    if missing:
        leaves = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
        close = [c for w in missing for c in difflib.get_close_matches(w, leaves, n=3, cutoff=0.4)]
        raise TargetNotFoundError(
            f"modules_to_save names {missing} that do not exist in {type(model).__name__}"
            + (f"; closest: {', '.join(dict.fromkeys(close))}" if close else "")
        )
    return found
