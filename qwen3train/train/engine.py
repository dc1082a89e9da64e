"""EngineConfig and the three engines: plain torch (single process or DDP), here; DeepSpeed ZeRO-1/2/3
(``train.deepspeed_engine``, the only module that imports deepspeed, and only when ``engine.backend=deepspeed``);
torch's FSDP2 (``train.fsdp_engine``, ``engine.backend=fsdp``).

All engines implement ``Engine`` (below), the surface the loop uses: ``forward(**batch)``;
``micro(last)``, the context of one micro-step (forward + backward; ``last`` marks the accumulation
boundary); ``backward(loss)``, which only back-propagates; ``step() -> grad norm``, the one optimizer
step per global batch; ``save(dir)`` / ``load(dir, saved_world)``; ``full_state_dict()`` (rank 0);
``module``. The loop calls ``backward`` once per micro-step (or per GradCache chunk), each inside its
``micro`` context, and ``step`` once per global batch. Gradients from several backward calls add up;
the loop scales the losses.

Precision is one rule for both engines (``qwen3train.precision``): float32 trainable weights and
optimizer state, bf16 compute through autocast when the run's precision is bf16. The torch engine
wraps its forward in ``torch.autocast``; DeepSpeed gets the same through its ``torch_autocast``
section (its ``bf16`` mode, which trains bf16 weights against fp32 copies, is not used).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

from qwen3train import dist
from qwen3train.errors import ConfigError
from qwen3train.precision import precision_name
from qwen3train.train.schedule import OptimConfig, build_optimizer


BACKENDS = ("torch", "deepspeed", "fsdp")
FSDP_LOADS = ("rank0", "every_rank")


@dataclass
class EngineConfig:
    """How a step is executed.

    global_batch_size: queries per optimizer step over all ranks. micro_batch_size: queries per rank
    in one forward/backward (or per GradCache chunk). Derived and checked: local batch =
    global / world, accumulation (or GradCache chunks) = local / micro.
    grad_cache: compute the loss over the whole global batch (all its in-batch negatives) while
    holding activations for one micro batch at a time; without it each micro step is its own batch.
    micro_batch_tokens: cut each rank's share into micro batches (GradCache chunks) of at most this
    many real tokens instead of ``micro_batch_size`` rows: short rows go many at a time, long ones
    few, so memory follows tokens, not the longest row (long documents). With GradCache the loss is
    the same whatever the cut; without it each embedder micro batch is its own contrastive batch
    (weighted by its rows), while the reranker's loss, a mean over independent groups, is unchanged.
    precision: compute precision, ``auto`` (bf16 for a bf16 model on hardware with native bf16,
    else fp32), ``bf16`` or ``fp32``; weights and optimizer state are float32 in every case.
    offload_optimizer: ZeRO-Offload (DeepSpeed only): optimizer state and step on the CPU, with
    DeepSpeed's CPU Adam (JIT-compiled on first use, ~1 min).
    deepspeed_config: a DeepSpeed JSON of your own, merged with the fields derived here (batch
    sizes, accumulation, clipping, ZeRO stage, precision); a conflicting value is an error naming
    both, ``"auto"`` takes ours.
    rehearse_memory: after the first step, run one dropped step on the heaviest micro batch the data
    can make, so a micro batch that does not fit stops the run in its first minute, not at the step
    that draws it (``train/memory.py``); null (auto): on CUDA (the torch engine or ZeRO 1-3).
    fsdp_load: how ``engine=fsdp`` on several processes gets the starting weights. ``rank0`` (default): rank 0
    reads the checkpoint; the others build the model with no weights (on the meta device) and receive their
    shards from rank 0 (host memory: one copy of the model per node instead of one per process; one read of
    the files). ``every_rank``: every process reads the whole checkpoint, then keeps its shard.
    zero3_init: ZeRO-3 on several processes: every process builds the model partitioned (DeepSpeed's ``zero.Init``:
    1/N of each parameter, never the whole model) and rank 0 alone reads the checkpoint, whose weights go into
    every rank's partitions. false: every process loads the whole model in float32 first (as ZeRO-1/2 do).
    fsdp_shard_size: ``engine=fsdp``: the processes one copy of the model's state is sharded over; the others hold
    copies of their own (hybrid sharding, HSDP: shard within a node, replicate across nodes, so that only the
    gradients' all-reduce crosses nodes, not every layer's gather). null, or at least the process count (a run
    resumed on fewer GPUs): all processes (plain FSDP). It must divide the process count.
    fsdp_reshard_after_forward: ``engine=fsdp``: free each decoder layer's gathered weights after its forward (true,
    the least memory: gathered again for its backward) or keep them until its backward (false: one gather fewer
    per layer and micro batch, and a GradCache step's no-grad pass gathers once for all its chunks; the whole
    model's compute-precision weights held during a step).
    """

    backend: str = "torch"
    zero_stage: int = 2
    micro_batch_size: int = 8
    global_batch_size: int = 32
    grad_cache: bool = False
    micro_batch_tokens: int | None = None
    precision: str = "auto"
    grad_clip: float = 1.0
    offload_optimizer: bool = False
    deepspeed_config: str | None = None
    rehearse_memory: bool | None = None
    fsdp_load: str = "rank0"
    zero3_init: bool = True
    fsdp_shard_size: int | None = None
    fsdp_reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"engine.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 0-3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("engine batch sizes must be >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"engine.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        self.precision = precision_name(self.precision, "engine.precision", training=True)
        if self.backend != "deepspeed" and (self.offload_optimizer or self.deepspeed_config):
            key = "engine.offload_optimizer" if self.offload_optimizer else "engine.deepspeed_config"
            raise ValueError(f"{key} needs a DeepSpeed engine (engine=zero1|zero2|zero3), got engine.backend="
                             f"{self.backend}")
        if self.rehearse_memory and self.backend == "deepspeed" and self.zero_stage == 0:
            raise ValueError("engine.rehearse_memory=true needs the torch engine or ZeRO stage 1-3 (DeepSpeed without "
                             "ZeRO does not drop a step whose gradients are not finite)")
        if self.fsdp_load not in FSDP_LOADS:
            raise ValueError(f"engine.fsdp_load must be one of {FSDP_LOADS}, got {self.fsdp_load!r}")
        if not self.fsdp_reshard_after_forward and self.backend != "fsdp":
            raise ValueError(f"engine.fsdp_reshard_after_forward=false needs engine=fsdp, got {self.backend}")
        if self.fsdp_shard_size is not None and (self.fsdp_shard_size < 1 or self.backend != "fsdp"):
            raise ValueError(f"engine.fsdp_shard_size needs engine=fsdp and a value >= 1, got {self.fsdp_shard_size} "
                             f"with engine.backend={self.backend}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs ZeRO stage 1, 2 or 3")

    def broadcast_load(self, world: int) -> bool:
        """Whether rank 0 alone reads the starting weights and broadcasts them (FSDP over several processes)."""
        return self.backend == "fsdp" and self.fsdp_load == "rank0" and world > 1

    def partitioned_build(self, world: int) -> bool:
        """Whether the model is built partitioned, rank 0 reading the weights (ZeRO-3 over several processes)."""
        return self.backend == "deepspeed" and self.zero_stage == 3 and self.zero3_init and world > 1

    def hybrid_shard(self, world: int) -> int | None:
        """``fsdp_shard_size`` against the process count: the shard group size of a hybrid (2-D) mesh, or None for
        plain FSDP over every process (no size, or one of at least the process count)."""
        size = self.fsdp_shard_size
        if size is None or size >= world:
            return None
        if world % size:
            raise ConfigError(f"engine.fsdp_shard_size={size} does not divide the {world} processes")
        return size

    def shard_groups_note(self, world: int, per_node: int) -> str | None:
        """A hybrid mesh's shard groups are runs of consecutive ranks; with ``per_node`` processes a node, a group
        that is not a whole number of nodes, nor a whole fraction of one, straddles two nodes: its every gather
        crosses them, which hybrid sharding is for avoiding. The note saying so, or None."""
        size = self.hybrid_shard(world)
        if size is None or per_node >= world or size % per_node == 0 or per_node % size == 0:
            return None
        return (f"note: engine.fsdp_shard_size={size} with {per_node} processes a node: some shard groups span two "
                f"nodes (their every layer gather crosses nodes); a multiple or a divisor of {per_node} keeps them "
                f"whole")

    def local_batch(self, world: int) -> int:
        if self.global_batch_size % world:
            raise ConfigError(f"engine.global_batch_size={self.global_batch_size} is not divisible by "
                              f"the {world} processes")
        return self.global_batch_size // world

    def micro_rows(self, world: int) -> int:
        """Rows of one forward on a rank: ``micro_batch_size``, or the whole per-process batch when that is
        smaller. ``micro_batch_size`` is a memory ceiling, so a config sized for one process runs unchanged on
        more (``make smoke NGPU=2``: global 8 over 2 processes is 4 rows each, under the ceiling of 8); the loss
        is over the global batch either way."""
        return min(self.micro_batch_size, self.local_batch(world))

    def micro_steps(self, world: int) -> int:
        local, rows = self.local_batch(world), self.micro_rows(world)
        if local % rows:
            raise ConfigError(f"per-process batch {local} (engine.global_batch_size / {world} processes) is "
                              f"not divisible by engine.micro_batch_size={self.micro_batch_size}")
        return local // rows


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.device_index())
    return torch.device("cpu")


def host_peak_mb() -> int:
    """This process's host memory peak so far (resident, MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def report_load(engine: str, spared: bool, if_spared: str, if_not: str, built_mb: int | None = None) -> None:
    """One line from rank 0 on how the starting weights came to the ranks (``spared``: this rank did not load the
    whole model; ``if_spared``'s ``{n}`` counts those ranks, ``{others}`` the ranks but 0, ``{ranks}`` all), with each
    rank's host memory peak so far and, given ``built_mb``, when the model was built (before the engine's own
    allocations, which on the CPU are host memory too). Collective."""
    ranks = dist.all_gather_object((spared, host_peak_mb(), built_mb))
    if dist.is_main():
        n = sum(e for e, _, _ in ranks)
        how = (if_spared if n else if_not).format(n=n, others=len(ranks) - 1, ranks=len(ranks))
        built = f"; with the model built, before the engine: {[b for _, _, b in ranks]}" if built_mb is not None else ""
        print(f"{engine}: {how} (host memory peak per rank, MB: {[mb for _, mb, _ in ranks]}{built})", flush=True)


ENGINE_FILES = {"torch": "engine.pt", "deepspeed": "deepspeed", "fsdp": "fsdp"}  # what each writes in <ckpt>/engine/


def check_written_by(path: Path, backend: str) -> None:
    """A checkpoint's engine state (``path``: its ``engine/`` folder) must be this engine's: resumed with another
    (``run.resume=force`` after changing ``engine=``) it is one line naming both, not a traceback."""
    if (path / ENGINE_FILES[backend]).exists():
        return
    other = next((b for b, f in ENGINE_FILES.items() if (path / f).exists()), None)
    by = f"engine.backend={other}" if other else "no engine this version knows"
    raise ConfigError(f"{path.parent} was written by {by}, not engine.backend={backend}: resume it with the engine it "
                      f"was started with, or start a new run from its weights with model.init_from="
                      f"{path.parent / 'model'} run.output_dir=<new folder>")


def clipped_step(params: list, grad_clip: float, optimizer, scheduler) -> tuple[float, bool]:
    """Clip, update, schedule: (the gradients' global norm, whether the update was applied). Gradients that are not
    finite are dropped instead: weights, optimizer moments and the schedule stay as they were. FSDP's sharded
    gradients (DTensors) give the norm over every rank's shards."""
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    applied = math.isfinite(norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied


class Engine(Protocol):
    @property
    def module(self) -> nn.Module: ...

    def forward(self, **batch) -> Any: ...

    def micro(self, last: bool) -> ContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float: ...  # the gradients' norm; sets step_applied (False: not finite, dropped)

    step_applied: bool

    def dropped_step(self) -> ContextManager: ...  # around a step made to be dropped: the engine's counters kept

    def lr(self) -> float: ...

    def save(self, path: Path, writer) -> None: ...  # writer: train/background.py (at once or in the background)

    def load(self, path: Path, saved_world: int | None = None) -> None: ...

    def full_state_dict(self) -> dict | None: ...

    def close(self, ended: bool) -> None: ...  # the run is over (ended: without an error): let go of its groups


class TorchEngine:
    """Single process or DDP; AdamW + LambdaLR; gradient clipping; bf16 autocast (CUDA or CPU)."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int,
                 precision: str = "fp32") -> None:
        self.cfg = cfg
        self.device = device()
        self.model = model.to(self.device)
        self.optimizer, self.scheduler = build_optimizer(model.named_parameters(), optim, total_steps)
        self.wrapped = model
        if dist.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.precision = precision
        self.autocast = precision == "bf16"
        self.step_applied = True

    @property
    def module(self) -> nn.Module:
        return self.model

    def forward(self, **batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.wrapped(**batch)

    def micro(self, last: bool):
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, update, schedule; returns the gradients' global norm. Gradients that are not finite are
        dropped instead (``step_applied`` False): weights, optimizer moments and the schedule stay as they
        were, as DeepSpeed's ZeRO optimizers do on an overflow. The norm is taken after DDP's all-reduce,
        so every rank decides alike."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm, self.step_applied = clipped_step(params, self.cfg.grad_clip, self.optimizer, self.scheduler)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def dropped_step(self):
        return contextlib.nullcontext()  # a dropped step leaves the optimizer and the schedule as they were

    def save(self, path: Path, writer) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            writer.save(torch.save, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                     "scheduler": self.scheduler.state_dict()}, path / "engine.pt")

    def load(self, path: Path, saved_world: int | None = None) -> None:
        """Model, optimizer and schedule are replicated, so any process count can resume them."""
        check_written_by(path, "torch")
        state = torch.load(path / "engine.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self):
        return None  # the module's own state dict is complete

    def close(self, ended: bool) -> None:
        pass  # DDP's reducer goes with the engine
