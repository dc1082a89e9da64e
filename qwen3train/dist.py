"""Distributed helpers: rank/world, init, gather with gradient. Identity on one process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(timeout_min: int = 30) -> None:
    """Join the process group that torchrun describes in the environment (no-op otherwise).

    NCCL when CUDA is present, gloo otherwise, so the same entry point runs on a laptop, one GPU or
    a multi-node cluster.
    """
    if is_dist() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradient flows back to each rank's slice.

    The backward of the autograd-aware all_gather is a reduce-scatter (sum), so rank r receives the
    sum over ranks of d(loss_k)/d(x_r); with DDP/DeepSpeed averaging gradients over ranks this is the
    gradient of the mean loss over the global batch.
    """
    if not is_dist() or world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if not is_dist() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist() or world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def broadcast_object(obj):
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
