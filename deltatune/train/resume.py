"""Where a run starts: step 0 in a fresh output_dir, or the newest intact checkpoint with `resume: true`.

Refused rather than guessed: without resume, an output_dir holding checkpoints or a finished adapter (it
would be overwritten); with resume, any setting outside `RESUMABLE` that differs from the checkpoint's (the
saved optimizer and schedule would silently keep the old values; the message names each key and the run
that does work instead), a max_steps below the checkpoint's step, and any change of max_steps for a method
whose schedule was fitted to it (`Method.fit_run`: AdaLoRA's budget, ReLoRA's restarts). A corrupted checkpoint is skipped, with
a warning line, for the next older one; if none is intact the run is refused, not restarted at step 0.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..core.config import ConfigError
from ..core.io import WEIGHTS_NAME
from ..core.registry import method_of
from .checkpoint import (
    CheckpointCorrupted, CheckpointError, DataPosition, list_checkpoints, load_checkpoint, read_checkpoint_state,
)
from .config import TrainConfig, config_to_dict
from .distributed import World

# Settings a resumed run may change: the length of the run and bookkeeping that does not change what is computed
# (gradient checkpointing changes what the backward keeps, not the gradients: tests/test_memory_mode.py).
RESUMABLE = {"max_steps", "save_every", "eval_every", "log_every", "keep_last", "resume", "output_dir", "tensorboard",
             "gradient_checkpointing"}


def _say(world: World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def resume_position(cfg: TrainConfig, model: nn.Module, optimizer, scheduler, hooks: list[Any], world: World,
                    adapter_name: str) -> tuple[int, DataPosition]:
    """(step, data position) to start from: the newest intact checkpoint's with resume, else (0, start).

    Refused: without resume, an output_dir holding checkpoints or a finished adapter; with resume, settings
    other than RESUMABLE that differ from the checkpoint's. A corrupted checkpoint is skipped for an older one."""
    checkpoints = list_checkpoints(cfg.output_dir)
    finished = Path(cfg.output_dir) / "adapter" / WEIGHTS_NAME
    if not cfg.resume:
        if checkpoints:
            raise ConfigError(
                f"output_dir {cfg.output_dir} already holds checkpoints (newest: {checkpoints[-1].name}); set resume: "
                "true (--resume true) to continue that run, or choose another output_dir"
            )
        if finished.is_file():
            raise ConfigError(
                f"output_dir {cfg.output_dir} already holds a finished adapter ({finished.parent}); choose another "
                "output_dir, or delete that adapter to train again there"
            )
        return 0, DataPosition()
    if not checkpoints:
        if finished.is_file():
            raise ConfigError(
                f"resume: output_dir {cfg.output_dir} has no checkpoint to resume from, only a finished adapter "
                f"({finished.parent}); to train it further, set init_adapter: {finished.parent} and another output_dir"
            )
        _say(world, f"resume: no checkpoint in {cfg.output_dir}, starting at step 0")
        return 0, DataPosition()
    for path in reversed(checkpoints):
        try:
            info = read_checkpoint_state(path)
            _refuse_changed_settings(info.config, run_record(cfg, world), info.path, info.step, cfg.max_steps)
            _refuse_refitted_schedule(info.config, cfg, info.path)
            checkpoint = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, hooks=hooks,
                                         adapter_name=adapter_name)
        except CheckpointCorrupted as exc:
            _say(world, f"warning: skipping a damaged checkpoint: {exc}")
            continue
        _say(world, f"resumed from {path} at step {checkpoint.step}")
        return checkpoint.step, checkpoint.position
    raise CheckpointError(
        f"resume: none of the {len(checkpoints)} checkpoints in {Path(cfg.output_dir) / 'checkpoints'} is intact (see the "
        "warnings above); delete that directory to start again, or set resume: false with another output_dir"
    )


def run_record(cfg: TrainConfig, world: World) -> dict[str, Any]:
    """What a checkpoint records of the run: the config, and the process count (it sets the global batch)."""
    return {**config_to_dict(cfg), "world_size": world.size}


def _refuse_changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path, step: int,
                             max_steps: int) -> None:
    changed = _changed_keys(saved, current)
    if changed:
        shown = "; ".join(f"{key} {_get(saved, key)!r} -> {_get(current, key)!r}" for key in changed)
        raise ConfigError(
            f"resume: these settings differ from the run in {path.parent.parent}: {shown}. A resumed run continues "
            f"the saved optimizer, schedule and data order, so only {', '.join(sorted(RESUMABLE - {'resume'}))} may "
            "change. Set them back, or start a new run from this checkpoint's adapter: "
            f"--init_adapter {path / 'adapter'} --output_dir <a new directory> (resume: false)"
        )
    if step > max_steps:
        raise ConfigError(f"resume: max_steps {max_steps} is below the step of the newest checkpoint ({step}) in "
                          f"{path.parent.parent}; set max_steps to at least {step}")


def _refuse_refitted_schedule(saved: Mapping[str, Any], cfg: TrainConfig, path: Path) -> None:
    config = cfg.adapter_config()
    if cfg.init_adapter or method_of(config).fit_run is None or saved.get("max_steps") == cfg.max_steps:
        return
    raise ConfigError(
        f"resume: max_steps {saved.get('max_steps')!r} -> {cfg.max_steps!r}, but {config.peft_type}'s schedule was fitted "
        f"to max_steps {saved.get('max_steps')!r} when the run started, so max_steps cannot change on resume; set it back, "
        f"or start a new run from this checkpoint's adapter: --init_adapter {path / 'adapter'} --output_dir <a new directory>")


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    current = json.loads(json.dumps(current, default=str))  # as stored: tuples become lists
    keys = sorted(set(saved) | set(current))
    changed = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "adapter":
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b and (prefix or key not in RESUMABLE):
            changed.append(prefix + key)
    return changed
