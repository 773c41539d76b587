"""FISH Mask (Sung, Nair & Raffel 2021, arXiv:2111.09839): train only the k weights of highest Fisher information.

    F̂_i = (1/N) Σ_n (∂ log p_θ(y_n | x_n) / ∂θ_i)²       empirical diagonal Fisher, per example (§3.2)
    M   = top-k of F̂ over every targeted weight at once     (k = keep_fraction · their count; global, not per layer)
    W'  = W + ΔW,   ΔW = scatter(values at indices)         a sparse weight delta, values 0 at start

The Fisher is computed once, before training, by the training loop's pre-pass (`deltatune.train.prepass`)
on the frozen base in the run's precision, summed over DDP processes (identical mask on every process), over
the first `num_examples` training examples (N; the paper's 1024) one at a time: ∂ log p(y|x) of each example
alone (the token log-likelihood of its labelled tokens, summed). `fisher="batch"` squares the gradient of a
batch's mean loss instead (one backward per `batch_size` examples: faster, a different estimator; named
option, never the default).

The delta lives on Linear layers only (`target_modules`, default "all-linear": every Linear but the output
head); norms and embeddings are not masked (refused by target: train them dense with `modules_to_save`, as the
paper keeps the classifier head trainable). It is additive, so it merges (W + ΔW), stacks with LoRA, mixes
per row (`deltatune.route`) and serves like any weight delta. File: per Linear, `fish_indices` (int32, flat
indices into W, sorted) and `fish_values` (fp32): k·(4+4) bytes plus the safetensors header, against
4·(out·in) per dense Linear (`file_bytes` reports both). The config records `kept` (module -> k) so that a
file loads with the right sizes. Deltatune's own method and file (`peft_type: "FISHMASK"`); peft has none.

Learning rate: 1e-4 (the paper's AdamW lr for BERT-large on GLUE is 1e-4..5e-4 at 0.5%).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import update_config
from ..core.config import AdapterConfig, ConfigError, check_positive_int
from ..core.delta import Delta
from ..core.model import adapters
from ..core.registry import register
from ..core.sites import Stage, Target, weight_kind

IGNORE_INDEX = -100


@dataclass(frozen=True)
class FishMaskConfig(AdapterConfig):
    """FISH Mask: a sparse delta on the top keep_fraction of Linear weights by Fisher information.

    keep_fraction: k as a fraction of the targeted weights, in (0, 1] (the paper: 0.005 on GLUE).
    num_examples: N, training examples the Fisher is estimated on (the paper: 1024).
    fisher: "empirical" (per-example gradients, the paper's) or "batch" (squared batch-mean gradients).
    batch_size: examples per forward for fisher="batch".
    kept: module -> k there; filled by the pre-pass (the file records it), None before.
    """

    peft_type: ClassVar[str] = "FISHMASK"
    recommended_lr: ClassVar[float] = 1e-4
    updatable_fields: ClassVar[tuple[str, ...]] = ("kept",)
    integer_tensors: ClassVar[tuple[str, ...]] = ("fish_indices",)  # int32 by design (`deltatune inspect` asks)

    target_modules: str | tuple[str, ...] | None = "all-linear"
    keep_fraction: float = 0.005
    num_examples: int = 1024
    fisher: Literal["empirical", "batch"] = "empirical"
    batch_size: int = 8
    kept: dict[str, int] | None = None

    def validate(self) -> None:
        check_fraction("keep_fraction", self.keep_fraction)
        check_positive_int("num_examples", self.num_examples)
        check_positive_int("batch_size", self.batch_size)
        if self.fisher not in ("empirical", "batch"):
            raise ConfigError(f"fisher must be 'empirical' (per-example gradients) or 'batch', got {self.fisher!r}")
        if self.kept is not None and not all(isinstance(v, int) and v >= 0 for v in self.kept.values()):
            raise ConfigError("kept must map module names to counts >= 0 (it is filled by the pre-pass)")


def check_fraction(name: str, value: Any) -> None:
    """A fraction in (0, 1], named in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")


class SparseDelta(Delta):
    """ΔW = scatter(fish_values at fish_indices) on a Linear: y + x·ΔWᵀ. k = 0 (before the pre-pass): identity."""

    additive = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return weight_kind(module) == "linear"

    def __init__(self, target: Target, config: Any) -> None:
        super().__init__(target, config)
        self.shape = tuple(target.weight.shape)
        k = (config.kept or {}).get(target.name, 0)
        n = self.shape[0] * self.shape[1]
        if k > n:
            raise ConfigError(f"kept names {k} weights for {target.name}, which has {n}")
        # placeholders until a file or the pre-pass gives the indices: k distinct positions, evenly spread
        self.register_buffer("fish_indices", (torch.arange(k) * (n // max(k, 1))).to(torch.int32))
        self.fish_values = nn.Parameter(torch.zeros(k))
        self.recording: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (input, probe) while the Fisher runs

    def set_mask(self, indices: torch.Tensor) -> None:
        """New sorted flat indices (values 0): the pre-pass's choice. Makes new tensors: build optimizers after."""
        device = self.fish_values.device
        self.fish_indices = indices.to(device=device, dtype=torch.int32).sort().values
        self.fish_values = nn.Parameter(torch.zeros(len(indices), device=device), requires_grad=self.fish_values.requires_grad)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype, device=self.fish_values.device)
        return flat.index_add(0, self.fish_indices.long(), self.fish_values.to(dtype)).view(self.shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor, stage: Stage) -> torch.Tensor:
        if self.recording is not None:  # the Fisher pre-pass: ∂L/∂W = Σ_t (∂L/∂y_t) x_tᵀ, from a probe on y
            probe = torch.zeros_like(y, requires_grad=True)
            self.recording.append((x.detach(), probe))
            y = y + probe
        if not len(self.fish_values):  # k = 0 here: still "used", so DDP finds a (0-element) gradient for it
            return y + self.fish_values.sum().to(y.dtype) if torch.is_grad_enabled() and self.fish_values.requires_grad else y
        return y + F.linear(x.to(self.fish_values.dtype), self.dense(self.fish_values.dtype)).to(y.dtype)

    def merge(self, weight, bias):
        return weight + self.dense(weight.dtype), bias

    def unmerge(self, weight, bias):
        return weight - self.dense(weight.dtype), bias


# ---- the Fisher pre-pass ------------------------------------------------------------------------------------
def example_log_likelihood(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over labelled tokens of log p(y_t | x, y_<t), per row (B,); for class labels (B,) (a sequence
    classifier such as MiniLM with a head), log p(y | x)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if labels.dim() == 1:
        return torch.log_softmax(model(**inputs).logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, -labels.shape[1]:]
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(dim=1)


def fisher_scores(deltas: dict[str, SparseDelta], model: nn.Module, data: Any, *, per_example: bool,
                  batch_size: int = 8, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Σ_n (∂ log p(y_n|x_n)/∂W)² / N for the base weight under each delta, summed over processes
    (data.reduce_sum). The gradient comes from the layer's input and a probe added to its output, so the base
    weight needs no gradient and may be quantized (NF4): ∂L/∂W = Σ_t (∂L/∂y_t) x_tᵀ. per_example=False squares
    the gradient of each batch's mean log-likelihood instead. `clip` first scales each weight's gradient to norm
    at most `clip` (Child-tuning_D's rule)."""
    scores = {k: torch.zeros(d.shape, dtype=torch.float32, device=d.fish_values.device) for k, d in deltas.items()}
    size = 1 if per_example else batch_size
    count = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    try:
        for start in range(0, len(data.examples), size):
            for delta in deltas.values():
                delta.recording = []
            batch = data.collate(data.examples[start:start + size])
            with torch.enable_grad(), data.autocast():
                loglik = example_log_likelihood(model, batch).mean()
            probes = [probe for d in deltas.values() for _, probe in d.recording]
            grads = dict(zip(map(id, probes), torch.autograd.grad(loglik, probes, allow_unused=True)))
            for key, delta in deltas.items():
                g = torch.zeros_like(scores[key])
                for x, probe in delta.recording:
                    dy = grads[id(probe)]
                    if dy is not None:
                        g += dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                if clip is not None:
                    g *= min(1.0, clip / (float(g.norm()) + 1e-6))
                scores[key] += g.square()
            count += 1
    finally:
        for delta in deltas.values():
            delta.recording = None
        model.train(was_training)
    data.reduce_sum(count)
    for value in scores.values():
        data.reduce_sum(value)
    return {k: v / max(float(count), 1.0) for k, v in scores.items()}


def top_k_masks(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Flat indices of the global top-k (k = round(fraction · total), at least 1) per tensor; ties by position."""
    keys = list(scores)
    flat = torch.cat([scores[k].flatten().cpu() for k in keys])
    k = max(1, round(fraction * flat.numel()))
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values
    out, offset = {}, 0
    for key in keys:
        n = scores[key].numel()
        inside = chosen[(chosen >= offset) & (chosen < offset + n)]
        out[key] = inside - offset
        offset += n
    return out


def apply_masks(model: nn.Module, name: str, masks: dict[str, torch.Tensor]) -> None:
    """Give each SparseDelta of adapter `name` its indices and record the counts in the config (`kept`)."""
    deltas = {path: delta for path, delta in adapters(model)[name].deltas(model) if isinstance(delta, SparseDelta)}
    for path, delta in deltas.items():
        delta.set_mask(masks.get(path, torch.zeros(0, dtype=torch.long)))
    update_config(model, name, kept={path: int(len(masks.get(path, ()))) for path in deltas})


def fisher_prepass(model: nn.Module, config: FishMaskConfig, name: str, data: Any) -> None:
    """The pre-pass: the Fisher over the first N examples, then the global top-k mask."""
    deltas = {path: d for path, d in adapters(model)[name].deltas(model) if isinstance(d, SparseDelta)}
    scores = fisher_scores(deltas, model, data, per_example=config.fisher == "empirical", batch_size=config.batch_size)
    apply_masks(model, name, top_k_masks(scores, config.keep_fraction))


def file_bytes(model: nn.Module, name: str) -> tuple[int, int]:
    """(bytes of the sparse tensors, bytes the same Linear weights take dense in fp32)."""
    sparse = dense = 0
    for _, delta in adapters(model)[name].deltas(model):
        if isinstance(delta, SparseDelta):
            sparse += delta.fish_indices.numel() * 4 + delta.fish_values.numel() * 4
            dense += delta.shape[0] * delta.shape[1] * 4
    return sparse, dense


register(FishMaskConfig, SparseDelta, prepass=fisher_prepass, readers=("deltatune",))
