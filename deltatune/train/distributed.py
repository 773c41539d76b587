"""Data-parallel training under torchrun: one process per device, one adapter, identical updates everywhere.

    torchrun --nproc-per-node 2 -m deltatune.cli train run.yaml

**Batches.** `batch_size` is per process, so the global batch of one micro-step is batch_size x world_size
examples (x grad_accum per optimizer step). Every process computes the same global batch order (the data
order depends only on seed and epoch) and takes its own contiguous slice of each global batch, so the ranks'
examples are disjoint and together are exactly what one process with batch_size x world_size would see. A
global batch too small to give every rank an example (the last one of an epoch, at most) is dropped; with
one process nothing is dropped.

**Loss.** Each rank backpropagates its *sum* of token losses; DDP averages the gradients over ranks; the loop
then multiplies them by world_size / N, where N is the number of target tokens of the whole step summed over
ranks (one all_reduce). The update therefore equals one process running the same global batch: mean loss
per target token over the step, however the tokens fall across ranks, micro-batches or padding.

**What is synchronised.** Only trainable (adapter) parameters: frozen base weights are excluded from DDP's
start-up broadcast and its gradient buckets (every rank loads the same base). `find_unused_parameters=False`:
every adapter parameter takes part in every forward. Only rank 0 logs and writes checkpoints and the final
adapter; the other ranks wait at a barrier so a checkpoint is complete before anyone goes on.

**Models that do not fit one device: FSDP.** DDP keeps a full copy of the base on every device. When the
base does not fit, shard it with FSDP2 (`torch.distributed.fsdp.fully_shard`) instead: apply `fully_shard`
to each decoder layer and then to the root, after attaching the adapter (so the LoRA parameters live in the
same shards as their base layer) and before building the optimizer. Frozen and trainable parameters may
share a layer under FSDP2 (it shards per parameter). Gradient checkpointing composes with it. Save the
adapter from rank 0 after gathering only the adapter tensors, e.g.
`torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(
full_state_dict=True, cpu_offload=True))` filtered to `deltatune.adapter_tensors(model, name)`'s names.
The token-count normalisation above applies unchanged (FSDP's reduce-scatter also averages over ranks).
deltatune's loop uses DDP; FSDP is a documented recipe, not a switch.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module started the process group and must end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} must be an integer (set by torchrun)") from None


def init_distributed() -> World:
    """The process's place in the job: started by torchrun (WORLD_SIZE > 1) or alone.

    Starts the process group (nccl on CUDA, gloo on CPU) unless one is already running.
    """
    size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank if size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    if dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    return World(rank, size, local_rank, device, owns)


def shutdown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Sequence[int], world: World) -> list[int]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one between ranks)."""
    base, extra = divmod(len(batch), world.size)
    start = world.rank * base + min(world.rank, extra)
    return list(batch[start:start + base + (world.rank < extra)])


def wrap(module: nn.Module, world: World) -> nn.Module:
    """DDP over the trainable parameters when distributed; the module itself otherwise."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ignore = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if ignore is not None:  # torch's (private) way to keep frozen weights out of the start-up broadcast
        ignore(module, [name for name, p in module.named_parameters() if not p.requires_grad])
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # broadcast_buffers=False: the buffers here are constants every rank loads alike (rotary frequencies, a 4-bit
    # base's packed codes); re-sending them from rank 0 before every forward would cost 54 MB per step for NF4
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False, broadcast_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module) if type(module).__name__ == "DistributedDataParallel" else module


@contextlib.contextmanager
def maybe_no_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on micro-steps before the last of an optimizer step."""
    if sync or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over ranks (in place); the tensor itself when alone."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def agree(value: float, what: str) -> None:
    """Check that every process holds the same `value` (state each process computes for itself, such as
    AdaLoRA's masking threshold or ReLoRA's pruning masks, must agree, or the replicas drift apart). One scalar
    all_reduce when distributed; nothing alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    both = torch.tensor([value, -value], dtype=torch.float64, device=backend_device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if float(both[0]) != float(value) or -float(both[1]) != float(value):
        raise RuntimeError(f"{what} differs between processes ({-float(both[1])} to {float(both[0])}); the processes "
                           "no longer hold the same adapter state")
