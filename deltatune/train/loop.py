"""The training loop: one plain function, `train`, that reads top to bottom.

    from deltatune.train.loop import train
    result = train("run.yaml", overrides=["--optim.lr", "1e-4"])
    result = train(data={"train": "sft.jsonl"}, init_adapter="runs/cpt/adapter", max_steps=200)

Each optimizer step: take the scheduler's learning rate (the methods' lr factors included); run `grad_accum`
micro-batches (forward, backward of the summed token losses); divide the gradients by the number of target
tokens of the whole step, summed over micro-batches and processes, so that batch 4 equals 4 accumulated
batches of 1 and N processes equal one process with N times the batch (torchtune's normalisation); add the
methods' extra loss terms (backward once, logged as aux_loss); clip; `before_step` hooks; optimizer step;
`on_step` hooks; scheduler step; zero the gradients; log; evaluate; checkpoint (the step-order table with
each method part is in hooks.py). A NaN/Inf loss or gradient
norm stops the run before anything of that step is saved, and so does a NaN/Inf weight or optimizer state at
a checkpoint (an optimizer step with a huge lr): `TrainingDiverged`, naming the last good checkpoint.

What runs before the first step (seed, precision, model, adapter, the bf16 base, checkpointing) is in
`model_setup.py`. One run per output_dir at a time (`lock.py`). Resuming (`resume: true`) restores adapter,
optimizer, scheduler, hook and RNG states and the data position from the newest intact checkpoint (a
corrupted newest one is skipped, and said so), so the losses that follow equal those of a run never interrupted. Only the
settings in `RESUMABLE` may differ from the checkpoint's; any other change is refused, naming it, because
the saved optimizer and schedule would silently keep the old values. Without `resume`, an output_dir that
holds checkpoints or a finished adapter is refused rather than overwritten. Ctrl-C raises
`TrainingInterrupted` (a KeyboardInterrupt) naming the last checkpoint; nothing extra is saved.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.io import save_adapter, saved_as
from ..core.model import active_adapters, adapter_configs, trainable_parameters_line
from ..core.registry import method_of
from ..threads import retune as retune_threads
from ..data import collate
from .batches import BatchStream, TrainData, load_data
from .checkpoint import DataPosition, latest_checkpoint, nonfinite_tensor, read_checkpoint_state, save_checkpoint
from .config import TrainConfig, config_to_dict, load_config
from .distributed import World, all_reduce_sum, barrier, init_distributed, maybe_no_sync, shutdown, wrap
from .lock import output_dir_lock
from .resume import RESUMABLE, resume_position, run_record  # noqa: F401 (RESUMABLE: part of this module's story)
from .hooks import run_before_step, run_on_step, step_hooks
from .loss import causal_lm_loss
from .model_setup import ADAPTER_NAME, fitted_adapter_config  # noqa: F401 (public here since the loop began)
from .model_setup import attach_adapter, autocast_for, main_print, model_and_tokenizer, prepare_base, seed_everything
from .optim import build_optimizer, build_scheduler
from .prepass import run_prepasses
from .progress import Progress


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm, or a weight or optimizer state became NaN/Inf; nothing of that step was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; `checkpoint` is the last checkpoint written (None if none), `step` the step reached."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    adapter_dir: Path  # output_dir/adapter, peft's format
    steps: int  # optimizer steps done in total (including those before a resume)
    last_loss: float | None  # of the last step run by this call; None if it ran none
    metrics_path: Path
    eval: dict[str, float] = field(default_factory=dict)  # the last evaluation (eval_loss, eval_perplexity)
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss, for the steps this call ran


def train(
    config: TrainConfig | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    model: nn.Module | str | os.PathLike | None = None,
    tokenizer: Any = None,
    hooks: Iterable[Any] = (),
    **values: Any,
) -> TrainResult:
    """Train an adapter as `config` says (a TrainConfig, a YAML path, or None for the defaults), with keyword
    `values` and CLI-style `overrides` applied on top. `model`/`tokenizer` replace loading `config.model`
    (a path or hub id as `model` is the same as `config.model`); `hooks` (StepHook objects) run after the
    adapter methods' own hooks."""
    if isinstance(model, (str, os.PathLike)):
        values, model = {**values, "model": str(model)}, None
    elif model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model= must be a torch module, a model directory or a hub id, got {type(model).__name__}")
    cfg = _resolve_config(config, overrides, values)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard: true needs the tensorboard package: pip install tensorboard (or set "
                          "tensorboard: false; metrics.jsonl and loss.png are written either way)")
    with contextlib.ExitStack() as cleanup:
        world = init_distributed()
        cleanup.callback(shutdown, world)
        if world.is_main:  # before anything is loaded or written: a second run into output_dir stops here
            cleanup.enter_context(output_dir_lock(cfg.output_dir))
        try:
            return _train(cfg, model, tokenizer, hooks, world)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            raise _interrupted(cfg) from None


def _train(cfg: TrainConfig, model: nn.Module | None, tokenizer: Any, hooks: Iterable[Any], world: World) -> TrainResult:
    adapter_config = fitted_adapter_config(cfg)  # a schedule that does not fit max_steps fails before anything runs
    seed_everything(cfg.seed)
    autocast = autocast_for(cfg.precision, world)
    model, tokenizer = model_and_tokenizer(cfg, model, tokenizer, world, autocast)
    data = load_data(cfg, tokenizer, world)
    attach_adapter(model, cfg, adapter_config, world)
    main_print(world, trainable_parameters_line(model))  # as peft's print_trainable_parameters
    prepare_base(model, cfg, autocast, world)  # bf16 frozen linears, gradient checkpointing
    run_prepasses(model, data.train, data.pad_id, world, autocast)  # FishMask's Fisher: before the optimizer exists
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps, model=model)
    hooks = step_hooks(model, hooks)
    step, position = resume_position(cfg, model, optimizer, scheduler, hooks, world, ADAPTER_NAME)
    stream = BatchStream(data.train, cfg, world, position)
    loss_module = wrap(_LossModule(model, cfg.loss_chunk_size), world)
    progress = Progress(cfg.max_steps, cfg.output_dir, tensorboard=cfg.tensorboard, enabled=world.is_main, start_step=step)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        losses: dict[int, float] = {}
        evals: dict[str, float] = {}
        tokens = 0  # input tokens since the last log line, all processes
        model.train()
        while step < cfg.max_steps:
            step += 1
            lr = _base_lr(optimizer)  # set by the scheduler at the end of the previous step
            loss, step_tokens = _micro_steps(loss_module, stream, data, params, cfg, world, autocast)
            aux_loss = _method_loss_terms(model)  # backpropagated: the gradients are of task mean + terms
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or math.inf))
            _check_finite(step, loss + (aux_loss or 0.0), grad_norm, cfg)
            run_before_step(hooks, model, optimizer, step)
            optimizer.step()
            run_on_step(hooks, model, optimizer, step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            retuned = retune_threads()  # an automatic thread count follows the cores other work leaves idle
            if retuned:
                main_print(world, retuned)
            losses[step], tokens = loss, tokens + step_tokens
            if step % cfg.log_every == 0 or step == cfg.max_steps:  # Progress adds tokens_per_s from `tokens`
                logged = {"loss": loss, "lr": lr, "tokens": tokens, "grad_norm": grad_norm}
                progress.log(step, logged if aux_loss is None else {**logged, "aux_loss": aux_loss})
                tokens = 0
            if data.eval and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                evals = _evaluate(model, data, cfg, world, autocast)
                progress.log(step, evals)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                _save_checkpoint(cfg, step, model, optimizer, scheduler, stream.position, hooks, world)
        progress.close()
    except TrainingDiverged:
        progress.close()  # the loss plot shows the divergence
        raise
    finally:
        progress.close(plot=False)  # after any other error no plot: nothing may hide the original error
    model.eval()  # as given: no dropout when the caller generates with it next
    adapter_dir = _save_final_adapter(model, cfg, world)
    return TrainResult(adapter_dir, step, losses.get(step), progress.jsonl, evals, losses)


def _interrupted(cfg: TrainConfig) -> TrainingInterrupted:
    latest = latest_checkpoint(cfg.output_dir)
    step = read_checkpoint_state(latest).step if latest else 0
    where = f"the last checkpoint is {latest} (step {step})" if latest else "no checkpoint was written yet"
    advice = "continue with resume: true (--resume true)" if latest else "start it again to train"
    return TrainingInterrupted(f"training interrupted; {where}; nothing else was saved; {advice}", step, latest)


# ---- the config (what is built from it before the first step: model_setup.py) ----------------------------
def _resolve_config(config: TrainConfig | str | Path | None, overrides: Sequence[str], values: Mapping[str, Any]) -> TrainConfig:
    if not isinstance(config, TrainConfig):
        return load_config(config, overrides, **values)
    if not overrides and not values:
        return config
    return load_config(None, overrides, **{**config_to_dict(config), **values})


# ---- one step -------------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Model and loss as one module, so DDP sees the whole forward (the chunked loss calls decoder and head apart)."""

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(self.model, batch, self.chunk_size)


def _micro_steps(loss_module: nn.Module, stream: BatchStream, data: TrainData, params: list[nn.Parameter],
                 cfg: TrainConfig, world: World, autocast) -> tuple[float, int]:
    """Forward and backward of grad_accum micro-batches; the gradients become d(mean loss per target token)
    over the whole step on every process. Returns (that mean loss, input tokens of the step on all processes)."""
    totals = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss sum, target tokens, input tokens
    for i in range(cfg.grad_accum):
        batch = collate([data.train[j] for j in stream.next()], data.pad_id)
        batch = {k: v.to(world.device) for k, v in batch.items()}
        with maybe_no_sync(loss_module, sync=i == cfg.grad_accum - 1):
            with autocast():
                loss_sum, n_targets = loss_module(batch)
            loss_sum.backward()
        mask = batch.get("attention_mask")  # absent on packed rows: count every position
        totals[0] += loss_sum.detach()
        totals[1] += n_targets
        totals[2] += mask.sum() if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
    all_reduce_sum(totals, world)
    n_targets = max(float(totals[1]), 1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(world.size / n_targets)  # DDP averaged over processes; undo that, divide by all tokens
    return float(totals[0]) / n_targets, int(totals[2])


def _method_loss_terms(model: nn.Module) -> float | None:
    """Backpropagate every trainable adapter's `Method.loss_term` (once per optimizer step, in fp32, after the
    task gradients were normalised: the gradient becomes that of task mean + Σ terms on every process, as the
    terms depend only on parameters every process holds alike). Returns their sum, or None if no method has one."""
    terms = [method_of(config).loss_term(model, config, name) for name, config in adapter_configs(model).items()
             if method_of(config).loss_term is not None and not config.inference_mode and name in active_adapters(model)]
    if not terms:
        return None
    total = torch.stack([t.float() for t in terms]).sum()
    total.backward()  # outside DDP's forward: its reducer ignores this backward, and every process adds the same
    return float(total.detach())


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the default parameter group (LoRA+ groups are multiples of it)."""
    groups = optimizer.param_groups
    return next((g["lr"] for g in groups if g.get("name", "default") == "default"), groups[0]["lr"])


def _check_finite(step: int, loss: float, grad_norm: float, cfg: TrainConfig) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
    raise TrainingDiverged(_diverged_message(step, what, cfg))


def _diverged_message(step: int, what: str, cfg: TrainConfig) -> str:
    """What diverged, the last good checkpoint, and advice that works: a new run, since resume keeps the settings."""
    latest = latest_checkpoint(cfg.output_dir)
    fixes = "a lower optim.lr" + ("" if cfg.optim.max_grad_norm else ", optim.max_grad_norm: 1.0") + \
        (", precision: fp32" if cfg.precision != "fp32" else "")
    if latest is None:
        return (f"step {step}: {what}; training stopped, no checkpoint was written yet. Train again with {fixes} "
                f"(remove {cfg.output_dir} or choose a new output_dir)")
    return (f"step {step}: {what}; training stopped and nothing from this step was saved. The last good checkpoint is "
            f"{latest}. Start a new run from it with {fixes} and --init_adapter {latest / 'adapter'} --output_dir "
            "<a new directory> (resume: true would repeat the same settings)")


def _evaluate(model: nn.Module, data: TrainData, cfg: TrainConfig, world: World, autocast) -> dict[str, float]:
    """Mean loss per target token over the eval split (each process takes every world_size-th example)."""
    model.eval()
    examples = data.eval[world.rank::world.size]
    totals = torch.zeros(2, dtype=torch.float64, device=world.device)
    starts = range(0, len(examples), cfg.batch_size)
    if world.is_main and len(starts) > 1:  # the final eval of a large split took minutes in silence
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    with torch.no_grad():
        for start in starts:
            batch = collate(examples[start:start + cfg.batch_size], data.pad_id)
            with autocast():
                loss_sum, n = causal_lm_loss(model, {k: v.to(world.device) for k, v in batch.items()}, cfg.loss_chunk_size)
            totals[0] += loss_sum
            totals[1] += n
    model.train()
    all_reduce_sum(totals, world)
    loss = float(totals[0]) / max(float(totals[1]), 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else math.inf}


# ---- saving ---------------------------------------------------------------------------------------------
def _save_checkpoint(cfg: TrainConfig, step: int, model: nn.Module, optimizer, scheduler, position: DataPosition,
                     hooks: list[Any], world: World) -> None:
    bad = nonfinite_tensor(model, optimizer, ADAPTER_NAME)  # the same on every process (DDP keeps them equal)
    if bad is not None:
        raise TrainingDiverged(_diverged_message(step, f"{bad} holds NaN/Inf after the optimizer step", cfg))
    if world.is_main:
        save_checkpoint(cfg.output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, position=position,
                        config=run_record(cfg, world), hooks=hooks, keep_last=cfg.keep_last, adapter_name=ADAPTER_NAME)
    barrier(world)


def _save_final_adapter(model: nn.Module, cfg: TrainConfig, world: World) -> Path:
    out = Path(cfg.output_dir) / "adapter"
    if world.is_main:
        save_adapter(model, out, ADAPTER_NAME)
        note = saved_as(out)
        print(f"adapter saved to {out}" + (f" ({note})" if note else ""), flush=True)
    barrier(world)
    return out
