"""Data-parallel helpers: process-group setup, fixed-shape feature gathering, loss reduction.

Training uses PyTorch's own ``DistributedDataParallel`` (DDP) for gradient
reduction (it overlaps the all-reduce with backward) and the *local loss* of
open_clip for the contrastive terms (see :mod:`regionmed.losses`):

1. every rank encodes its local batch, padded to fixed shapes (``B`` images,
   ``K`` ROIs per image, ``N`` negatives per ROI, ``M`` per image), so every
   gathered field has the same shape on every rank: one all-gather per field, no
   shape exchange;
2. :func:`gather_with_grad` all-gathers the features *with* gradient (PyTorch's
   autograd all-gather: its backward sums, for each rank's slice, the gradients
   that every rank's loss sends to it);
3. each rank scores only its own rows against all gathered columns (plus its own
   hard negatives), normalised by the *global* number of rows, so the per-rank
   losses sum to the single-process loss on the union batch;
4. the trainer back-propagates ``world_size ×`` its local loss and DDP averages
   the gradients: the result is the gradient of the single-process loss on the
   union batch (tested with real processes).

The memory and compute of the loss per rank grow as ``B_local × B_global``
instead of ``B_global²``.

"Equal" assumes a deterministic forward pass: with dropout active (MiniLM's default
0.1), each sample's mask depends on which rank draws it, so losses agree only in
distribution. Every rank is seeded alike, so a checkpoint's RNG state (saved by rank 0)
is valid for every rank and resume stays exact.

Launch with ``torchrun``: :func:`init_distributed` reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``. Without them it is a single process and no
process group is created; every helper here is then the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from regionmed.config import ConfigError

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_dist",
    "get_rank",
    "get_world_size",
    "gather_with_grad",
    "gather_tensor",
    "all_reduce_sum",
    "prepare_batchnorm",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def init_distributed(
    backend: str | None = None, device: str | torch.device | None = None
) -> DistInfo:
    """Set up the process group from the ``torchrun`` environment variables.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``.
    With ``WORLD_SIZE`` unset or 1 no process group is created. ``device``
    overrides the chosen device (default: ``cuda:LOCAL_RANK`` with CUDA, with
    NCCL required to be on CUDA; ``cpu`` otherwise). Calling it again when the
    group already exists reuses the group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"

    if device is not None:
        dev = torch.device(device)
    elif cuda and (backend == "nccl" or world_size == 1):
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if backend == "nccl" and world_size > 1 and dev.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, got {dev}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if world_size > 1 and not is_dist():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev, rank == 0)


def cleanup_distributed() -> None:
    """Destroy the process group, if there is one."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` ``(n, ...)`` along dim 0 over all ranks, in rank order → ``(world·n, ...)``.

    Differentiable: PyTorch's autograd all-gather
    (``torch.distributed._functional_collectives.all_gather_single_autograd``),
    whose backward gives each rank the *sum* over ranks of the gradients that
    reach its slice (a reduce-scatter). Every rank must call it with the same
    shape and dtype (the training task pads every field to configured maxima).
    With one process ``x`` is returned unchanged.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def gather_tensor(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 without gradient (ids, masks; bool is moved as uint8).

    Same contract as :func:`gather_with_grad`: equal shapes on every rank.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    send = x.detach()
    is_bool = send.dtype == torch.bool
    if is_bool:
        send = send.to(torch.uint8)
    from torch.distributed._functional_collectives import all_gather_single

    out = all_gather_single(send.contiguous(), gather_dim=0, group=dist.group.WORLD)
    out = out.wait() if hasattr(out, "wait") else out  # an AsyncCollectiveTensor until waited on
    return out.bool() if is_bool else out


def all_reduce_sum(x: Tensor) -> Tensor:
    """The element-wise sum of ``x`` over ranks (a detached copy; ``x`` itself in one process)."""
    if not is_dist() or dist.get_world_size() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def prepare_batchnorm(model, world_size: int, device: torch.device | str) -> str | None:
    """Make a model's BatchNorm image tower fit for data-parallel training; returns a note or None.

    * one process, or a tower without BatchNorm (ViTs): nothing to do (None);
    * CUDA: the tower's BatchNorm layers become ``torch.nn.SyncBatchNorm`` (their statistics
      over the union batch, as in one process); the parameters are the same objects;
    * CPU: PyTorch has no CPU SyncBatchNorm, so each process normalises whole images with
      its own batch statistics (not equal to one process; the returned note says so).

    ROI crops never use batch statistics in the default ``crop_batchnorm: running``.
    ``crop_batchnorm: batch`` with more than one process raises
    :class:`~regionmed.config.ConfigError`: a process whose batch holds no crop would skip
    the synchronised layers that the others enter.
    """
    tower = model.image_tower
    if world_size <= 1 or not tower.batchnorms:
        return None
    if tower.cfg.crop_batchnorm == "batch":
        raise ConfigError(f"model.image.crop_batchnorm 'batch' is not supported with {world_size} processes: "
                          "use 'running' (the default)")
    if torch.device(device).type == "cuda":
        model.image_tower = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tower)
        return None
    return (f"image tower {tower.cfg.name!r} has BatchNorm and PyTorch has no CPU SyncBatchNorm: each of the "
            f"{world_size} processes normalises whole images with its own batch statistics (not equal to one "
            "process; the saved running statistics are rank 0's); on GPUs they are synchronised")

