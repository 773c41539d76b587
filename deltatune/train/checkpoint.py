"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    output_dir/checkpoints/step-000050/
        adapter/             the adapter in peft's format (deltatune.save_adapter): usable on its own
        trainer_state.pt     optimizer and scheduler state, RNG states (python, numpy, torch CPU, CUDA), hook states,
                             and the live adapter tensors when the file is a save-only view of them (AdaLoRA's
                             pruned ranks, ReLoRA's export; `deltatune.core.io.file_view`): resume restores those
        state.json           step, data position (epoch, next batch of that epoch), the TrainConfig
        complete             written last: the name and size of every file above

A checkpoint appears atomically: it is written into `checkpoints/.tmp-step-000050-<pid>/`, every file is
fsynced, `complete` goes in last, and only then is the directory renamed to `step-000050` (a rename within
one directory is atomic). Older checkpoints beyond `keep_last` are deleted only after the new one is in place.
A process killed at any moment therefore leaves either the previous checkpoints alone or the new one
complete; `latest_checkpoint` skips anything else with a warning, and `load_checkpoint` refuses it (a file
of the written size whose content does not read, say a flipped bit, is refused as corrupted too, so that the
caller can fall back to an older checkpoint). A checkpoint holding NaN/Inf is never written.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..core.io import adapter_tensors, read_adapter, save_adapter
from ..core.model import adapters
from .hooks import fit_hook_states, hook_states, load_hook_states

CHECKPOINTS = "checkpoints"
MARKER = "complete"
ADAPTER = "adapter"
TRAINER_STATE = "trainer_state.pt"
STATE = "state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupted or does not fit this run; nothing was restored from it."""


class CheckpointCorrupted(CheckpointError):
    """A checkpoint whose files are incomplete or unreadable (an older one may still be intact)."""


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: the next global batch to take is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    position: DataPosition
    config: dict[str, Any]


def nonfinite_tensor(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     adapter_name: str = "default") -> str | None:
    """The name of the first adapter weight or optimizer-state tensor holding NaN/Inf, or None if all are finite."""
    for key, tensor in adapter_tensors(model, adapter_name).items():
        if not torch.isfinite(tensor.detach()).all():
            return f"adapter tensor {key}"
    for group_state in (optimizer.state.values() if optimizer is not None else ()):
        for key, value in group_state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"optimizer state {key}"
    return None


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


# ---- writing --------------------------------------------------------------------------------------------
def _write_failed(exc: BaseException) -> bool:
    """A failed file write: ENOSPC/EDQUOT/EFBIG, or torch.save's "[enforce fail at inline_container.cc] ...
    file write failed" RuntimeError, which is how a full disk shows through PyTorch's zip writer."""
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    text = str(exc)
    return "inline_container" in text or "write failed" in text


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: DataPosition,
    config: Mapping[str, Any],
    hooks: Sequence[Any] = (),
    keep_last: int = 2,
    adapter_name: str = "default",
) -> Path:
    """Write the checkpoint of `step` atomically, then keep only the newest `keep_last` checkpoints."""
    tensors = adapter_tensors(model, adapter_name)
    bad = next((k for k, t in tensors.items() if not torch.isfinite(t.detach()).all()), None)
    if bad is not None:
        raise CheckpointError(f"adapter tensor {bad} holds NaN/Inf at step {step}; the checkpoint was not written")
    final = checkpoint_dir(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp / ADAPTER, adapter_name)
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                   "hooks": hook_states(hooks)}
        if adapters(model)[adapter_name].method.save_view is not None:  # the file may not be the live state
            trainer["adapter"] = {k: t.detach().to("cpu").clone() for k, t in tensors.items()}
        torch.save(trainer, tmp / TRAINER_STATE)
        state = {"format_version": FORMAT_VERSION, "step": step, "epoch": position.epoch, "batch": position.batch,
                 "config": dict(config)}
        (tmp / STATE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        for name in files:
            _fsync(tmp / name)
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
        _fsync(tmp / MARKER)
        _fsync(tmp / ADAPTER)
        _fsync(tmp)
        _replace_dir(tmp, final)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CheckpointError) or not _write_failed(exc):
            raise
        free = shutil.disk_usage(final.parent).free / 2**20
        raise CheckpointError(f"writing checkpoint {final} failed ({_first_line(exc)}); {free:.0f} MiB are free on that "
                              "disk, which is probably full. Free space (or save less often: --save_every, "
                              "--keep_last); the newest intact checkpoint is kept and resume continues from it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(final.parent)
    _prune(final.parent, keep_last, keep=final)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():  # the same step written again (a resumed run): swap, never leave a half directory
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    complete = [p for _, p in _step_dirs(root) if (p / MARKER).is_file()]
    for path in complete[:-keep_last]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # from a process killed while writing
        shutil.rmtree(leftover, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"the checkpoint holds RNG states of {len(state['cuda'])} GPUs but {torch.cuda.device_count()} "
                          "are visible; CUDA random numbers (dropout) will differ from the original run", stacklevel=3)


# ---- finding and reading --------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files all have their written sizes."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointCorrupted(f"{root} is not a checkpoint directory")
    marker = root / MARKER
    if not marker.is_file():
        raise CheckpointCorrupted(
            f"{root} has no '{MARKER}' marker: its writer stopped before finishing, so it may be partial; "
            "delete it, or resume from an earlier checkpoint"
        )
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointCorrupted(f"{marker} is unreadable; the checkpoint is corrupted") from None
    for name, size in files.items():
        file = root / name
        if not file.is_file():
            raise CheckpointCorrupted(f"{root} is corrupted: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointCorrupted(f"{root} is corrupted: {name} has {file.stat().st_size} bytes, {size} were written")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every step directory under output_dir/checkpoints, oldest first (complete or not)."""
    return [p for _, p in _step_dirs(Path(output_dir) / CHECKPOINTS)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of the run in `output_dir`; incomplete or corrupted ones are skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
            continue
        return path
    return None


def read_checkpoint_state(path: str | os.PathLike) -> Checkpoint:
    """The step, data position and config of a verified checkpoint, without touching any model."""
    root = Path(path)
    verify_checkpoint(root)
    try:
        state = json.loads((root / STATE).read_text())
        if not isinstance(state.get("config"), dict):
            raise TypeError("no config mapping")
        return Checkpoint(root, int(state["step"]), DataPosition(int(state["epoch"]), int(state["batch"])), state["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointCorrupted(f"{root / STATE} is unreadable ({exc}); the checkpoint is corrupted") from None


def _read_states(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors, trainer state) of a checkpoint; any failure to read or parse them is a CheckpointError."""
    try:
        _, tensors, _ = read_adapter(root / ADAPTER)
    except Exception as exc:  # AdapterFileError, or safetensors' own error on a damaged file
        raise CheckpointCorrupted(f"{root / ADAPTER} cannot be read ({_one_line(exc)}); the checkpoint is corrupted") from None
    try:
        trainer = torch.load(root / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip errors, EOFError, ...: damaged bytes can raise almost anything
        raise CheckpointCorrupted(f"{root / TRAINER_STATE} cannot be read ({_one_line(exc)}); the checkpoint is corrupted") from None
    expected = {"optimizer": dict, "scheduler": dict, "rng": dict, "hooks": list}
    if not isinstance(trainer, dict) or any(not isinstance(trainer.get(k), t) for k, t in expected.items()):
        raise CheckpointCorrupted(f"{root / TRAINER_STATE} does not hold a trainer state; the checkpoint is corrupted")
    return tensors, trainer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    hooks: Sequence[Any] = (),
    adapter_name: str = "default",
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore adapter weights (into the adapter already attached as `adapter_name`), optimizer, scheduler,
    hook and RNG states from checkpoint `path`. Everything is read and checked before anything is changed."""
    info = read_checkpoint_state(path)
    root = info.path
    tensors, trainer = _read_states(root)
    tensors = trainer.get("adapter", tensors)  # the live tensors, where the file is a save-only view of them
    live = adapter_tensors(model, adapter_name)
    if set(live) != set(tensors) or any(live[k].shape != tensors[k].shape for k in live):
        raise CheckpointError(
            f"{root / ADAPTER} does not fit adapter {adapter_name!r} of this model (different target modules or r); "
            "resume with the adapter config of the run that wrote it"
        )
    if fit_hook_states(trainer["hooks"], len(hooks)) is None:
        raise CheckpointError(
            f"{root} holds state for {len(trainer['hooks'])} step hooks but this run has {len(hooks)}; resume with the "
            "same adapter methods and hooks= as the run that wrote it"
        )
    try:
        if optimizer is not None:
            optimizer.load_state_dict(trainer["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(trainer["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{root / TRAINER_STATE}: optimizer/scheduler state does not fit this run ({exc})") from None
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(tensors[key])
    load_hook_states(list(hooks), trainer["hooks"])
    if restore_rng:
        try:
            _set_rng_state(trainer["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointCorrupted(f"{root / TRAINER_STATE}: RNG state unreadable ({_one_line(exc)}); the checkpoint is corrupted") from None
    return info
