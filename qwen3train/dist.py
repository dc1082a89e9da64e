"""Distributed helpers: rank/world, init, collectives. Identity on one process.

This is the only module of the package that calls ``torch.distributed`` (a test enforces it), so
the rules below hold for every collective the project issues:

* **The process group serves both devices.** On a CUDA machine the group is created as
  ``cpu:gloo,cuda:nccl``: CUDA tensors go through NCCL, CPU tensors through gloo. A plain ``nccl``
  group has no CPU backend at all, so the first collective on a CPU tensor (a logged statistic, a
  token count, an object broadcast) would stop a multi-GPU run.
* **Our own collectives run on** ``comm_device()`` (the local GPU under NCCL, else the CPU): the
  helpers here move their inputs there and hand results back on the caller's device, so callers
  never decide where a collective's tensor lives.

``QWEN3TRAIN_DIST_BACKEND`` overrides the backend string (e.g. ``nccl`` alone, or ``cpu:gloo`` for
a CPU-only run on a GPU node).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from qwen3train.net import free_port


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; the world where it is not set)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def device_index() -> int:
    """The GPU this process computes on: its local rank, wrapped over the GPUs present, so that several
    processes can share one GPU (with ``QWEN3TRAIN_DIST_BACKEND=gloo``: NCCL refuses two ranks per GPU)."""
    return local_rank() % max(torch.cuda.device_count(), 1)


def is_main() -> bool:
    return rank() == 0


def backend_spec(cuda: bool | None = None) -> str:
    """The backend string ``init`` passes to ``init_process_group``."""
    override = os.environ.get("QWEN3TRAIN_DIST_BACKEND")
    if override:
        return override
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init(timeout_min: int = 30, *, single_process: bool = False) -> None:
    """Join the process group that torchrun describes in the environment.

    No-op on one process, unless ``single_process`` (DeepSpeed needs a group even then: a one-rank
    group is created from the environment, with defaults for a lone process).
    """
    if is_dist():
        return
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        if not single_process:
            return
        for key, val in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                         ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, val)
    # Before the group exists: this module names the default group as its functions' default argument
    # (``group=group.WORLD``), evaluated when it is first imported (by torch._dynamo, transformers' model code,
    # sentence-transformers). Imported after, those defaults hold the group past ``destroy_process_group``: its
    # gloo threads (and a one-process run's store server) live on into the interpreter's teardown, where
    # destroying them aborted a rank now and then (``terminate called without an active exception``, SIGABRT,
    # on the success path of 2-rank runs under load). Imported first, the defaults are None (the default group).
    import torch.distributed.nn.functional  # noqa: F401
    if torch.cuda.is_available():
        # before the group exists: gloo initialises at once and NCCL (sub)groups must find the right GPU.
        # No ``device_id``: it makes NCCL initialise eagerly, which DeepSpeed's own sub-groups do not expect.
        torch.cuda.set_device(device_index())
    dist.init_process_group(backend=backend_spec(), timeout=datetime.timedelta(minutes=timeout_min))
    atexit.register(_destroy_at_exit)


_CHECKPOINT_GROUP = []  # the group of ``checkpoint_group``, once made


def checkpoint_group():
    """A gloo group over every process, for a checkpoint's collectives on a thread of its own (an FSDP checkpoint
    written in the background: ``torch.distributed.checkpoint`` plans and finishes a save with collectives). Its
    collectives never interleave with those the training thread issues on the default group meanwhile, which two
    threads on one group would (in an order no rank agrees on). Collective the first time (every rank calls it at
    the same save); CPU tensors only."""
    if not _CHECKPOINT_GROUP:
        _CHECKPOINT_GROUP.append(dist.new_group(backend="gloo"))
    return _CHECKPOINT_GROUP[0]


def release_checkpoint_group() -> None:
    """Destroy ``checkpoint_group``'s group (the run is over; no save is in flight): its gloo threads do not live on
    into the interpreter's teardown (see ``_destroy_at_exit``)."""
    if _CHECKPOINT_GROUP and is_dist():
        dist.destroy_process_group(_CHECKPOINT_GROUP[0])
    _CHECKPOINT_GROUP.clear()


def _destroy_at_exit() -> None:
    """Destroy the group before the interpreter is torn down, on every way out (``sys.exit(2)`` on a user's
    mistake, an exception). A process that leaves a gloo group alive into finalization can die there with
    ``terminate called without an active exception`` (SIGABRT): measured on 7 of 25 two-rank runs that end
    on ``sys.exit`` with the cores busy, 0 of 25 with this handler; torchrun then reports the rank as
    crashed and the run's status is no longer the mistake's 2."""
    _CHECKPOINT_GROUP.clear()  # destroyed with every other group below
    if is_dist():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the process is ending; a peer may already be gone
            pass
        # objects in reference cycles that name a group (a DeepSpeed engine and its hooks) go now, and the
        # group with them, while the interpreter still runs
        gc.collect()


def is_default_group(group) -> bool:
    """``group`` is the default (world) group itself, not a group made over the same ranks."""
    return group is dist.group.WORLD


def world_mesh(device_type: str, shard: int | None = None):
    """A device mesh over every process (FSDP's): one-dimensional, or with ``shard`` < world processes, two
    dimensions (``replicate``, ``shard``): groups of ``shard`` consecutive ranks (a node's, under torchrun) each
    hold one sharded copy. torch builds the 1-D mesh on the world group (measured with torch 2.13 on gloo), the 2-D
    one on groups of its own, which the destruction of every group at exit (``_destroy_at_exit``) ends too."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world_size()
    if shard is None or shard >= world:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def release_mesh(mesh) -> None:
    """Empty the mesh's own registry of its group (``_pg_registry``): torch's caches keep the mesh, and through it the
    group, past ``destroy_process_group``, its gloo threads still alive at exit (the state in which a rank can abort
    after its work is done)."""
    registry = getattr(mesh, "_pg_registry", None)  # torch 2.13; where it is missing the mesh holds no group
    if isinstance(registry, dict):
        registry.clear()


def comm_device() -> torch.device:
    """Where the tensors of this module's collectives live: the local GPU when the group has NCCL."""
    if torch.cuda.is_available() and is_dist() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_dist():
        if comm_device().type == "cuda":  # name the GPU: NCCL would otherwise guess it from the rank
            dist.barrier(device_ids=[comm_device().index])
        else:
            dist.barrier()


def cleanup() -> None:
    if is_dist():
        barrier()
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradient flows back to each rank's slice.

    The backward of the autograd-aware all_gather is a reduce-scatter (sum), so rank r receives the
    sum over ranks of d(loss_k)/d(x_r); with DDP/DeepSpeed averaging gradients over ranks this is the
    gradient of the mean loss over the global batch. ``x`` lives where the model computes (the GPU
    under NCCL), which is where it is gathered.
    """
    if not is_dist() or world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    # through comm_device(): a no-op under NCCL; a CUDA tensor under gloo goes via the CPU and back
    # (both moves are differentiable), since gloo gathers CPU tensors only
    y = x.contiguous().to(comm_device())
    return torch.cat(dist_fn.all_gather(y), dim=0).to(x.device)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if not is_dist() or world_size() == 1:
        return x
    y = x.detach().to(comm_device()).contiguous()
    out = [torch.empty_like(y) for _ in range(world_size())]
    dist.all_gather(out, y)
    return torch.cat(out, dim=0).to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, on the caller's device (reduced on ``comm_device()``)."""
    if not is_dist() or world_size() == 1:
        return x
    y = x.detach().to(comm_device(), copy=True)
    dist.all_reduce(y)
    return (y / world_size()).to(x.device)


def mean_floats(values: Sequence[float]) -> list[float]:
    """Means over ranks of a few Python numbers, in one float64 collective (the loop's statistics)."""
    if not is_dist() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def max_int(value: int) -> int:
    """The largest of one integer over ranks (one collective; the value itself on one process)."""
    if not is_dist() or world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj):
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_(tensors) -> None:
    """Rank 0's values of ``tensors`` into every rank's, in place (each where it lives: a GPU's go over NCCL)."""
    if not is_dist() or world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=0)


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one without a group)."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
