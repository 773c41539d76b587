"""A pass over the training data before training: the seam for methods that look at data first.

    attach ──► the frozen base in the run's precision (frozen_bf16, NF4) ──► Method.prepass(model, config,
    name, PrepassData) ──► optimizer, scheduler, resume ──► the steps

Users: FishMask's Fisher information (Sung et al. 2021, §3.2), Child-tuning_D's (Xu et al. 2021, §3.2);
the LoRA-initialisation issue's EVA (Paischer et al. 2024: SVD of activations over the first batches) takes
the same signature. A method registers `prepass=` with `deltatune.register`; the loop calls it once per
trainable adapter that has one (`run_prepasses`), before the optimizer exists, so the prepass may resize
or re-initialise the adapter's tensors (FishMask chooses its k indices there).

The one signature: `prepass(model, config, name, data) -> None`, `data` a `PrepassData`:

    examples     this process's share of the first `num_examples` training examples, in the data's order
                 (the same on every run, so a resumed run recomputes the same result before its checkpoint
                 is loaded over it)
    collate      list of examples -> a batch dict on the device (input_ids, attention_mask, labels)
    autocast     the run's precision context (bf16 autocast or a no-op)
    reduce_sum   tensor -> its sum over processes, in place (identity on one process): a prepass sums its
                 statistics with it, so its result is identical on every DDP process

What a prepass computes is kept in the adapter's own tensors (indices, values, a re-initialised matrix),
so the adapter file and the checkpoints hold it, and nothing else needs saving.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ..core.model import adapter_configs
from ..core.registry import method_of
from ..data import collate as collate_examples


@dataclass
class PrepassData:
    examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    autocast: Callable[[], ContextManager[Any]]
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]


def local_data(examples: list[dict[str, Any]], pad_id: int = 0, device: str | torch.device = "cpu",
               autocast: Callable[[], ContextManager[Any]] | None = None) -> PrepassData:
    """PrepassData for one process from tokenized examples (what `deltatune.train` builds, for use from Python)."""
    import contextlib

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate_examples(batch, pad_id).items()}

    return PrepassData(list(examples), collate, autocast or contextlib.nullcontext, lambda t: t)


def run_prepasses(model: nn.Module, examples: list[dict[str, Any]], pad_id: int, world: Any,
                  autocast: Callable[[], ContextManager[Any]]) -> list[str]:
    """Run `Method.prepass` of every trainable adapter whose method has one; returns their names.

    Each process gets its share (round robin) of the first `config.num_examples` examples (all of them if the
    config has no such field)."""
    from .distributed import all_reduce_sum

    ran = []
    for name, config in adapter_configs(model).items():
        prepass = getattr(method_of(config), "prepass", None)
        if prepass is None or config.inference_mode:
            continue
        count = getattr(config, "num_examples", None) or len(examples)
        share = examples[:count][world.rank::world.size]

        def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            all_reduce_sum(tensor, world)
            return tensor

        data = local_data(share, pad_id, world.device, autocast)
        prepass(model, config, name, PrepassData(data.examples, data.collate, autocast, reduce_sum))
        ran.append(name)
    return ran
