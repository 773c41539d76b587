"""Keeping a training process small and fast: the frozen base in bf16, out of the checkpoint file's mapping.

Two measured sources of resident memory that have nothing to do with the adapter (SmolLM2-135M, batch
4x256, LoRA r=16 all-linear, bf16 autocast; figures in docs/benchmarks.md):

* Under autocast every frozen `nn.Linear` casts its fp32 weight to bf16 on each call (autocast caches the
  cast only for weights that require grad). `store_frozen_linears_in_bf16` stores those weights in bf16
  once: the products are bit-for-bit the ones autocast computed, without a cast per call, in half the
  memory. Embeddings, norms and a head tied to the embeddings keep their dtype.
* Generating under bf16 autocast, the same casts dominate a decode step, and the largest is the output head
  tied to the embeddings (49152x576 on SmolLM2). `store_for_bf16_inference` also gives such a head its own
  bf16 weight: a 16-row decode forward of SmolLM2-135M went from 0.157 to 0.058 CPU s, same logits bit for bit.
* A model loaded from safetensors is memory-mapped; touching its pages makes the whole file resident.
  Copying the remaining tensors out of the mapping lets it close, and the pages under each tensor replaced
  by a copy (bf16 or a clone) are handed back as it is made, so that the copies never add to the whole
  file: the peak while preparing SmolLM2 for bf16 training went from 1.33 to 0.90 GB.

Gradient checkpointing recomputes each decoder layer's forward in the backward, matmuls included (+1/3 of the
decoder's matmul work). `selective_checkpointing_context` is the selective policy (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", §4.3; torch's selective activation
checkpointing): the outputs of the matmuls that are expensive to redo are stored, everything cheap per byte is
recomputed - norms, rotary, SiLU, the residual adds, casts, and LoRA's B(A x) (its reduction dimension is the
rank).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
from collections.abc import Callable, Set

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# a matmul whose reduction dimension is at most this is cheaper to redo than to keep (2·K FLOPs per element kept)
CHEAP_REDUCTION = 64
_MATMULS = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1, torch.ops.aten.bmm.default: 0}
_ATTENTION = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name)}


def _keep_outputs(min_reduction: float, max_width: float, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Store attention's outputs and those of the matmuls whose reduction dimension exceeds `min_reduction` and
    whose output width is at most `max_width`; recompute the rest."""
    if op in _ATTENTION:
        return CheckpointPolicy.MUST_SAVE
    if op in _MATMULS:
        first, second = args[_MATMULS[op]], args[_MATMULS[op] + 1]  # (N, K) or (B, N, K); (K, M) or (B, K, M)
        kept = first.shape[-1] > min_reduction and second.shape[-1] <= max_width
        return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


# store attention's and the wide matmuls' outputs
_keep_expensive = functools.partial(_keep_outputs, CHEAP_REDUCTION, math.inf)


@functools.cache
def _libc_function(symbol: str) -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_freed_heap() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); False where there is no glibc.

    glibc keeps freed blocks under its mmap threshold (which grows up to 32 MiB as large blocks are freed)
    resident for reuse; between a checkpointed forward and its backward those blocks are the forward's
    freed intermediates, which the backward's differently sized allocations do not reuse, so they add to
    the peak. The next allocations that land on released pages fault them in again."""
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


def selective_checkpointing_context(min_reduction: float = CHEAP_REDUCTION, max_width: float = math.inf
                                    ) -> Callable[[], tuple]:
    """`context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` (and transformers'
    `activation_checkpointing_kwargs`): the selective policy of this module's docstring. A larger
    `min_reduction` or a smaller `max_width` keeps fewer matmul outputs (min_reduction=math.inf: attention's
    only; max_width=hidden size: not the MLP's gate and up projections, the widest outputs)."""
    policy = functools.partial(_keep_outputs, min_reduction, max_width)
    return functools.partial(create_selective_checkpoint_contexts, policy)


class _FilePages:
    """The pages of this process's memory-mapped *.safetensors files under tensors that were replaced by copies.

    A mapping stays resident, every page ever read, until its last tensor is gone; releasing each replaced
    tensor's pages (madvise MADV_DONTNEED, whole pages inside its bytes only) as its copy is made keeps the
    copies from adding to the whole file at the peak (SmolLM2 in bf16: 1.33 GB while building). Only ranges
    inside a mapping of a *.safetensors file are released; where /proc/self/maps or madvise is missing
    (not Linux, not glibc), nothing is. A released page that is read again is read from the file, so
    another tensor viewing the same bytes would see the file's values, not in-place changes to them."""

    DONTNEED = 4  # MADV_DONTNEED on Linux

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip().endswith(".safetensors"):
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        self.ranges.append((start, end))
        except OSError:
            pass
        self.madvise = _libc_function("madvise") if self.ranges else None
        self.page = mmap.PAGESIZE

    def release(self, replaced: torch.Tensor) -> None:
        """`replaced`: a contiguous CPU tensor no longer used by anything (its data was copied elsewhere)."""
        if self.madvise is None or replaced.device.type != "cpu" or not replaced.is_contiguous():
            return
        start = replaced.data_ptr()
        end = start + replaced.numel() * replaced.element_size()
        if not any(low <= start and end <= high for low, high in self.ranges):
            return
        low, high = -(-start // self.page) * self.page, end // self.page * self.page
        if high > low:
            self.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), self.DONTNEED)


def store_frozen_linears_in_bf16(model: nn.Module, *, skip: Set[int] = frozenset(), frozen_only: bool = True) -> int:
    """Store every frozen `nn.Linear` weight and bias of `model` in bf16; returns how many layers changed.
    `skip`: ids of modules to leave alone; frozen_only=False: trainable ones too (they are frozen first).

    Only for training under bf16 autocast (it changes fp32 results otherwise). A linear whose weight is
    also the input embedding (a tied output head) is left alone: the embedding's output would change dtype.
    """
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    shared = embedding.weight if isinstance(embedding, nn.Module) else None
    changed, pages = 0, _FilePages()
    for module in model.modules():
        if type(module) is not nn.Linear or id(module) in skip or module.weight is shared \
                or (frozen_only and module.weight.requires_grad):
            continue
        if not frozen_only:
            module.requires_grad_(False)
        if module.weight.dtype != torch.bfloat16:
            old = module.weight.data
            module.weight.data = old.to(torch.bfloat16)
            pages.release(old)
            changed += 1
        if module.bias is not None and not module.bias.requires_grad:
            old = module.bias.data
            module.bias.data = old.to(torch.bfloat16)
            pages.release(old)
    return changed


def store_for_bf16_inference(model: nn.Module) -> int:
    """For a model that will only run under bf16 autocast (evaluation, generation): store its base's linear
    weights in bf16 (`store_frozen_linears_in_bf16`, adapters' own layers excluded, so that kernels that read
    their fp32 factors are unaffected) and give an output head tied to the embeddings its own bf16 weight (the
    embedding keeps its dtype: the residual stream stays as autocast keeps it). Logits are bit for bit those of
    the model before the call under the same autocast, for the base and for adapters that use the weight only
    through its product (LoRA, IA3, prompt tuning; DoRA's row norms then read the bf16 weight, as they do in
    training under frozen_bf16). The model should not be trained or saved afterwards (the head is untied).
    Returns how many layers changed."""
    from ..core.sites import Site

    adapter_layers = {id(m) for site in model.modules() if isinstance(site, Site) for m in site.deltas.modules()}
    changed = store_frozen_linears_in_bf16(model, skip=adapter_layers, frozen_only=False)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if type(head) is nn.Linear and embedding is not None and head.weight is embedding.weight \
            and head.weight.dtype != torch.bfloat16:
        head.weight = nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
        changed += 1
    return changed


def copy_out_of_file_mappings(model: nn.Module) -> None:
    """Give every CPU parameter and buffer its own memory, so a memory-mapped checkpoint file can be released.

    A tensor loaded from safetensors shares one mapping with the whole file; the mapping, and every page
    of it ever read, stays resident while any tensor still points into it. Tied parameters stay tied.
    """
    pages = _FilePages()
    for tensor in [*model.parameters(), *model.buffers()]:  # parameters() lists a tied parameter once
        if tensor.device.type == "cpu":
            old = tensor.data
            tensor.data = old.clone()
            pages.release(old)
