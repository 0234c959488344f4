"""Data-parallel helpers: process-group setup, feature gathering, gradient reduction.

Why not ``DistributedDataParallel``
-----------------------------------
The trainer does not wrap the model in DDP, because the set of trainable modules
changes between training stages (the ROI processor is off during warm-up, the
encoders may be frozen in some stages), and DDP fixes its parameter set and
gradient buckets once, at construction. Instead, data-parallel training works
like this:

1. every rank encodes its local batch;
2. :func:`gather_with_grad` all-gathers the features, so every rank holds the
   same union batch; only the rank's own slice stays attached to its autograd
   graph (the other slices are plain copies);
3. every rank computes the *same* loss on the union batch and calls
   ``backward``: this yields the gradient of that loss through its local slice
   only;
4. :func:`all_reduce_gradients` SUM-reduces the parameter gradients.

The loss is a function of the union features, and its gradient w.r.t. any
parameter is the sum, over all feature rows, of the chain-rule term through that
row. Each rank computes exactly the terms of its own rows, so the sum over ranks
equals single-process training on the union batch, exactly (up to
floating-point summation order), for any loss and any per-rank batch size.

One caveat: a parameter used *after* the gather (the learnable temperature, for
instance) receives the full gradient on every rank, so its SUM would be
``world_size`` times too large. :func:`scale_grad` fixes that;
:func:`regionmed.losses.gather_loss_inputs` applies it to the logit scale.

Launch with ``torchrun``: :func:`init_distributed` reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``. Without them it is a single process and no
process group is created; every helper here is then a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_dist",
    "get_rank",
    "get_world_size",
    "gather_with_grad",
    "all_reduce_gradients",
    "scale_grad",
]

DEFAULT_BUCKET_MB = 25.0


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


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``factor``."""
    if factor == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, factor)


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 over all ranks, in rank order.

    The result is differentiable w.r.t. the *local* slice only: the other ranks'
    slices are detached copies, and the local tensor itself is put back in its
    slot (with ``torch.cat``), so ``backward`` reaches this rank's encoders.
    Ranks may have different first-dim sizes (zero included); trailing dims,
    dtype and device kind must agree, otherwise every rank raises the same
    ``RuntimeError`` (no rank hangs). Every rank must call this collectively.
    Integer and bool tensors are gathered too (without gradient). With one
    process ``x`` is returned unchanged.
    """
    if not is_dist():
        return x
    world = dist.get_world_size()
    if world == 1:
        return x
    rank = dist.get_rank()

    # Shapes first (all dims, so a trailing-shape mismatch is caught on every rank).
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    ndim = torch.tensor([x.dim()], dtype=torch.long, device=x.device)
    ndims = [torch.empty_like(ndim) for _ in range(world)]
    dist.all_gather(ndims, ndim)
    if len({int(n) for n in ndims}) != 1:
        raise RuntimeError(
            f"gather_with_grad: ranks disagree on tensor rank: {[int(n) for n in ndims]}"
        )
    if x.dim() == 0:
        raise RuntimeError("gather_with_grad needs at least one dimension (got a scalar)")
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_l = [tuple(int(v) for v in s.tolist()) for s in shapes]
    if len({s[1:] for s in shapes_l}) != 1:
        raise RuntimeError(f"gather_with_grad: trailing shapes differ between ranks: {shapes_l}")
    sizes = [s[0] for s in shapes_l]
    max_size = max(sizes)
    if max_size == 0:
        return x

    # Collectives do not take bool everywhere; move it as uint8.
    send = x.detach()
    if send.dtype == torch.bool:
        send = send.to(torch.uint8)
    if send.shape[0] < max_size:
        pad = send.new_zeros((max_size - send.shape[0], *send.shape[1:]))
        send = torch.cat([send, pad], dim=0)
    send = send.contiguous()
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send)

    parts = [r[:n].to(x.dtype) for r, n in zip(received, sizes)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


def all_reduce_gradients(
    params: Iterable[nn.Parameter],
    bucket_mb: float = DEFAULT_BUCKET_MB,
    restore_unused: bool = True,
) -> None:
    """SUM-all-reduce the ``.grad`` of every parameter with ``requires_grad``.

    A missing gradient counts as zeros and is materialised first, so every rank
    issues identical collectives even when a module saw no data on some rank.
    Gradients are flattened into buckets of about ``bucket_mb`` MiB per
    (device, dtype). With ``restore_unused``, a parameter that had no gradient
    on *any* rank gets ``grad = None`` back afterwards, as it would have in
    single-process training (optimisers skip such parameters; a zero gradient
    would still move them through momentum and weight decay). This costs one
    extra tiny collective. No-op without a process group.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return
    for p in trainable:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError("all_reduce_gradients does not support sparse gradients")

    had_grad = [p.grad is not None for p in trainable]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in trainable:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    cap = max(1, int(bucket_mb * 1024 * 1024))
    for grads in groups.values():
        bucket: list[Tensor] = []
        nbytes = 0
        for g in grads:
            size = g.numel() * g.element_size()
            if bucket and nbytes + size > cap:
                _reduce_bucket(bucket)
                bucket, nbytes = [], 0
            bucket.append(g)
            nbytes += size
        if bucket:
            _reduce_bucket(bucket)

    if restore_unused:
        flags = torch.tensor(had_grad, dtype=torch.int32, device=trainable[0].device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for p, used in zip(trainable, flags.tolist()):
            if not used:
                p.grad = None


def _reduce_bucket(grads: list[Tensor]) -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)
