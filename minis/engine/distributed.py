"""Everything the Trainer needs to run on one process or on many (``torchrun``).

Data parallel training in four ideas:

1. ``torchrun --nproc_per_node N`` starts N copies of the same script and tells each one its
   ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` through environment variables;
   :func:`init_distributed` reads them and joins the process group (gloo on CPU, nccl on GPU).
2. Every rank holds a full copy of the model; ``DistributedDataParallel`` averages the gradients
   during ``backward()``, so the copies stay identical.
3. Every rank trains on a different part of each epoch: :func:`epoch_batches` draws one
   permutation, the same on all ranks (seeded with ``(seed, epoch)``), and deals it out.
4. Evaluation is split too (:func:`shard_indices`, every image on exactly one rank) and the
   partial results are combined: an ``all_reduce`` of the confusion matrix, or an
   ``all_gather_object`` of the per-image detections.

On a single process every helper here is a no-op, so the Trainer has one code path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its machine: picks the GPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and progress bars."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when ``torchrun`` started more than one process (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` prepared; without ``torchrun`` return rank 0 of 1.

    The backend follows the device: ``nccl`` for CUDA tensors, ``gloo`` for CPU tensors. The
    address of rank 0 comes from the environment (``MASTER_ADDR``/``MASTER_PORT``, set by
    ``torchrun``). Calling it again once the group exists is harmless.
    """
    if not launched_by_torchrun():
        return DistInfo()
    if not is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank())


def cleanup() -> None:
    """Leave the process group (at the end of a ``torchrun`` script)."""
    if is_initialized():
        dist.destroy_process_group()


def derive_seed(*values: int) -> int:
    """One well-mixed 63-bit seed from several integers, e.g. ``(seed, epoch)``.

    ``seed + epoch`` would make (seed 0, epoch 1) and (seed 1, epoch 0) draw the same numbers;
    numpy's ``SeedSequence`` hashes the whole tuple instead.
    """
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))  # 63 bits: fits torch.manual_seed on every platform


def num_batches(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """How many batches :func:`epoch_batches` gives each rank per epoch."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def epoch_batches(
    num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's training batches for one epoch, as lists of dataset indices.

    All ranks draw the same permutation (its generator is seeded with ``(seed, epoch)`` only),
    so together they cover the dataset once. The permutation is wrapped around to a multiple of
    ``world_size`` - DDP needs every rank to take the same number of steps - and rank ``r`` takes
    every ``world_size``-th index from position ``r``. The last batch may be smaller.

    Because the order is a pure function of ``(seed, epoch)``, a run resumed in the middle of
    an epoch can rebuild the same list and skip the batches it has already trained on.
    """
    if num_samples == 0:
        raise ValueError("cannot train on an empty dataset")
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    order = torch.randperm(num_samples, generator=generator)
    per_rank = math.ceil(num_samples / world_size)
    wrapped = order.repeat(math.ceil(per_rank * world_size / num_samples))[: per_rank * world_size]
    mine = wrapped[rank::world_size].tolist()
    return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]


def shard_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Evaluation shard of this rank: indices ``rank, rank + world_size, ...``.

    No padding, unlike training: a padded copy of an image would be counted twice in the
    metrics. Ranks may therefore get one image more or less than each other, which is fine
    because evaluation has no gradient synchronisation.
    """
    return list(range(rank, num_samples, world_size))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (the tensor must live on this rank's device)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (any picklable object)."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. batch-norm running statistics) to every rank.

    DDP keeps parameters identical, but each rank updates its batch-norm statistics on its own
    batches after the start-of-forward broadcast; evaluating with rank 0's buffers everywhere
    makes every rank's predictions match the model in the checkpoint.
    """
    if is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=src)
