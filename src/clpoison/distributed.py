"""Several processes (torchrun): the process group, DDP, synchronised BatchNorm and the few
collectives the method needs, each a no-op in a single process.

Launch any command under ``torchrun --nproc_per_node=N``; :func:`init_from_env` (called by every
run's set-up) opens the process group from torchrun's environment (NCCL on GPUs, gloo on CPUs)
and puts each rank on ``cuda:LOCAL_RANK``. Every rank holds the whole dataset and the whole poison;
a global batch of B images is split into contiguous shards of B/N, one per rank, so the global
batch is the same for any N. What crosses processes:

- gradients of the networks that train (:func:`wrap_ddp`, DDP's bucketed all-reduce);
- BatchNorm statistics (:func:`convert_sync_batchnorm`: ``torch.nn.SyncBatchNorm`` on GPUs,
  :class:`SyncBatchNorm` here on CPUs, where torch's needs a GPU);
- contrastive negatives, with a correct gradient (:func:`gather_with_grad`);
- poison updates: the all-reduced gradient of a class-wise poison, the updated rows of a
  sample-wise one (:func:`all_gather_rows`, never a dense all-reduce of the whole poison).

Example::

    device = init_from_env("auto")            # cuda:LOCAL_RANK, or cpu (gloo)
    model = wrap_ddp(convert_sync_batchnorm(model), device)
    z_all = gather_with_grad(z)               # (N * world, D), gradient to every rank's slice
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from clpoison.errors import ClpoisonError
from clpoison.utils import rank_and_world

__all__ = ["SyncBatchNorm", "agree", "all_gather_rows", "all_reduce_", "barrier", "broadcast_buffers",
           "check_divisible", "convert_sync_batchnorm", "env_world_size", "gather_with_grad",
           "init_from_env", "is_distributed", "local_device", "shard_rows", "shutdown", "wrap_ddp"]


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return rank_and_world()[1] > 1


def env_world_size() -> int:
    """The number of processes torchrun launched (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ClpoisonError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch "
                            f"with torchrun") from None


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (an explicit
    ``cuda:N`` is kept: every rank on GPU N is the user's choice)."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device, timeout_minutes: float = 60.0) -> torch.device:
    """Open the process group from torchrun's environment (once; a no-op in one process) and
    return the device this rank runs on. NCCL on CUDA, gloo otherwise. ``timeout_minutes`` bounds
    a collective; evaluation never waits on one (every rank evaluates)."""
    device = local_device(device)
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise ClpoisonError("this torch build has no torch.distributed; run in one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # NCCL for CUDA tensors, gloo for the few CPU ones (rows of a poison kept on the host, the
    # images of the offline defenses).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    """Close the process group, if one is open (end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (after rank 0 writes a file the others read)."""
    if is_distributed():
        dist.barrier()


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (the others pass anything): whether to go on, e.g. after
    rank 0 tried to take the output lock."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, 0)
    return bool(t.item())


def check_divisible(batch_size: int, what: str = "train.batch_size") -> None:
    """A global batch must split evenly over the processes."""
    world = rank_and_world()[1]
    if batch_size % world:
        lower = batch_size - batch_size % world
        raise ClpoisonError(f"{what} is {batch_size}, the global batch, and does not divide over "
                            f"{world} processes; use a multiple of {world} (e.g. {lower or world})")


def shard_rows(rows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """This rank's contiguous share of a global batch ``rows``, and its place in it
    ``(start, total)``: rank r of N takes ``torch.tensor_split(rows, N)[r]``."""
    rank, world = rank_and_world()
    total = rows.shape[0]
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return rows[start:start + base + (rank < extra)], (start, total)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces the gradient of the whole gathered tensor (every
    rank's loss depends on every rank's rows) and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, ...) of every rank concatenated in rank order, (n * world, ...), with the exact
    gradient: backward sums every rank's gradient with respect to this rank's rows. Every rank
    must pass the same n. The identity in one process."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_(t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """In place: the sum (or mean) of ``t`` over ranks, without gradient. Returns ``t``."""
    if is_distributed():
        dist.all_reduce(t)
        if mean:
            t.div_(rank_and_world()[1])
    return t


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (``rows`` (n_r,), ``values`` (n_r, ...)), concatenated in rank order; n_r may
    differ between ranks (padded to the largest for the transfer). The updated rows of a
    sample-wise poison travel this way: B rows a step, not the whole poison."""
    if not is_distributed():
        return rows, values
    world = rank_and_world()[1]
    n = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    pad_rows = torch.zeros(most, dtype=rows.dtype, device=rows.device)
    pad_rows[:rows.shape[0]] = rows
    pad_vals = values.new_zeros((most, *values.shape[1:]))
    pad_vals[:values.shape[0]] = values
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    all_vals = [torch.empty_like(pad_vals) for _ in range(world)]
    dist.all_gather(all_rows, pad_rows)
    dist.all_gather(all_vals, pad_vals.contiguous())
    return (torch.cat([r[:s] for r, s in zip(all_rows, sizes)]),
            torch.cat([v[:s] for v, s in zip(all_vals, sizes)]))


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BN running statistics) on every rank."""
    if is_distributed():
        for b in module.buffers():
            dist.broadcast(b, 0)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, for CPUs and gloo
    (``torch.nn.SyncBatchNorm`` needs a GPU). Mean and variance over all ranks' samples, in two
    passes (mean, then centred squares) with the exact gradient through both all-reduces; running
    statistics updated as BatchNorm does from the global batch. Plain BatchNorm in one process or
    in eval mode; the same parameters and buffers, so checkpoints load either way."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor(float(xf.numel() // xf.shape[1]), device=x.device)
        total = all_reduce_(count.clone())
        mean = _AllReduceSum.apply(xf.sum(dims)) / total
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised across ranks (torch's on CUDA, ours elsewhere),
    in place where the root is not itself a BatchNorm. Parameters and buffers carry over."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        # The same Parameter and buffer objects (requires_grad, optimiser references and devices
        # carry over: a frozen momentum copy stays frozen).
        for name, p in module.named_parameters(recurse=False):
            setattr(sync, name, p)
        for name, b in module.named_buffers(recurse=False):
            setattr(sync, name, b)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        new = _convert_cpu(child)
        if new is not child:
            setattr(module, name, new)
    return module


def wrap_ddp(module: nn.Module, device: torch.device, broadcast_buffers: bool = False) -> nn.Module:
    """``module`` inside DistributedDataParallel (gradients averaged over ranks in the backward),
    or ``module`` itself in one process. Keep a reference to the bare module for everything but
    the training forward (evaluation, poison steps, checkpoints)."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers are synchronised from rank 0 once at construction either way; newer torch names
    # the per-forward broadcast ``forward_sync_buffers``.
    key = ("forward_sync_buffers" if "forward_sync_buffers"
           in inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=ids, **{key: broadcast_buffers})
