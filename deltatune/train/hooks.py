"""Per-step method hooks and the other training-side parts of a method, in the order the loop runs them.

One optimizer step (`step` counts from 1; s = step − 1 is the scheduler's index):

    | # | what                                   | method part (registry.Method)   | user                          |
    |---|----------------------------------------|---------------------------------|-------------------------------|
    | 0 | lr = schedule(s) · Π lr_factor(s)      | lr_factor (inside the scheduler)| ReLoRA's re-warmup            |
    | 1 | micro-steps: forward, backward of the  |                                 |                               |
    |   | token-loss sums; grads / all tokens    |                                 |                               |
    | 2 | extra loss terms, backward once        | loss_term                       | AdaLoRA's γ·R (AdapterFusion) |
    | 3 | clip, NaN/Inf check                    |                                 |                               |
    | 4 | hook.before_step                       | step_hook                       | Child-tuning / FishMask masks |
    | 5 | optimizer.step()                       |                                 |                               |
    | 6 | hook.on_step (gradients still present) | step_hook                       | AdaLoRA's scores and masks;   |
    |   |                                        |                                 | ReLoRA's merge and reset;     |
    |   |                                        |                                 | DyLoRA's next rank            |
    | 7 | scheduler.step(), optimizer.zero_grad()|                                 |                               |
    | 8 | log (loss, aux_loss, lr, ...), eval,   | hook state_dict; save_view for  | AdaLoRA's EMAs; the pruned /  |
    |   | checkpoint                             | the file, live tensors kept     | exported file                 |

Before the run: `fit_run` fills and checks run-length fields (AdaLoRA's total_step from max_steps) before
anything is loaded. So `before_step` and `on_step` both see this step's final (clipped) gradients, task
and loss terms together. `before_step` is where a method changes the gradients the optimizer will use
(Child-tuning's Bernoulli masks, Xu et al. 2021); `on_step` runs after the update (AdaLoRA's sensitivity
scores |w·∇w|, Zhang et al. 2023; ReLoRA's merge and optimizer-state reset, Lialin et al. 2023; DyLoRA's rank
sample for the next step, Valipour et al. 2023). Under DDP every process runs every hook on the same
all-reduced gradients; state a process derives for itself must agree (`distributed.agree`).

A method registers a factory with `deltatune.register(..., step_hook=factory)`; `step_hooks(model)` builds
one hook per trainable adapter of that method. A hook with state that must survive a resume (an EMA of
importance scores, a private generator) adds `state_dict()` / `load_state_dict(state)`; checkpoints store it.
Stateless hooks (no state_dict, or an empty one) may be added or left out at the end of the list on resume.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

from torch import nn
from torch.optim import Optimizer

from ..core.model import adapter_configs
from ..core.registry import method_of


@runtime_checkable
class StepHook(Protocol):
    def before_step(self, model: nn.Module, optimizer: Optimizer, step: int) -> None: ...

    def on_step(self, model: nn.Module, optimizer: Optimizer, step: int) -> None: ...


class Hook:
    """A StepHook whose calls do nothing; subclass it and override the ones you need."""

    def before_step(self, model: nn.Module, optimizer: Optimizer, step: int) -> None:
        """After clipping, before optimizer.step(): gradients are final and may be changed."""

    def on_step(self, model: nn.Module, optimizer: Optimizer, step: int) -> None:
        """After optimizer.step(), before zero_grad(): weights are updated, gradients still present."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (called when a run resumes from a checkpoint)."""


def step_hooks(model: nn.Module, extra: Iterable[Any] = ()) -> list[StepHook]:
    """Hooks of the methods of the model's trainable adapters (in attach order), then `extra`.

    An adapter loaded for inference (frozen) gets no hook. Each extra hook must have `on_step`, and may
    leave out `before_step`.
    """
    hooks: list[Any] = []
    for name, config in adapter_configs(model).items():
        factory = method_of(config).step_hook
        if factory is None or config.inference_mode:
            continue
        hook = factory(model, config, name)
        if hook is not None:
            hooks.append(hook)
    for hook in extra:
        if not callable(getattr(hook, "on_step", None)):
            raise TypeError(
                f"hook {hook!r} has no on_step(model, optimizer, step) method; subclass deltatune.train.hooks.Hook"
            )
        hooks.append(hook)
    return hooks


def run_before_step(hooks: Iterable[Any], model: nn.Module, optimizer: Optimizer, step: int) -> None:
    for hook in hooks:
        before = getattr(hook, "before_step", None)
        if before is not None:
            before(model, optimizer, step)


def run_on_step(hooks: Iterable[Any], model: nn.Module, optimizer: Optimizer, step: int) -> None:
    for hook in hooks:
        hook.on_step(model, optimizer, step)


def hook_states(hooks: Iterable[Any]) -> list[dict[str, Any] | None]:
    """Per hook (by position), its state_dict(), or None for a stateless hook (no state_dict, or an empty one)."""
    return [(hook.state_dict() or None) if callable(getattr(hook, "state_dict", None)) else None for hook in hooks]


def fit_hook_states(states: list[dict[str, Any] | None], count: int) -> list[dict[str, Any] | None] | None:
    """The saved states for a run with `count` hooks, by position: stateless hooks may come and go at the end
    (a test's kill hook, a progress hook); None when a saved state would find no hook."""
    if len(states) > count and any(state is not None for state in states[count:]):
        return None
    return [*states[:count], *[None] * (count - len(states))]


def load_hook_states(hooks: list[Any], states: list[dict[str, Any] | None]) -> None:
    """Give each hook the state saved at its position; stateless hooks may come and go between runs."""
    fitted = fit_hook_states(states, len(hooks))
    if fitted is None:
        raise ValueError(
            f"the checkpoint holds state for {len(states)} step hooks but this run has {len(hooks)}; resume with "
            "the same adapter methods and the same hooks= as the run that wrote it"
        )
    for hook, state in zip(hooks, fitted):
        if state is not None and callable(getattr(hook, "load_state_dict", None)):
            hook.load_state_dict(state)
