"""EngineConfig and the two engines: plain torch (single process or DDP) and DeepSpeed ZeRO-1/2/3.

This is the only module that imports deepspeed, and only when ``engine.backend=deepspeed``; the DeepSpeed
JSON config it hands over is made in ``train.ds_config``.

Both engines implement ``Engine`` (below), the surface the loop uses: ``forward(**batch)``;
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
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

from qwen3train import dist
from qwen3train.errors import ConfigError
from qwen3train.precision import precision_name
from qwen3train.train.ds_config import deepspeed_config, offloads_optimizer
from qwen3train.train.schedule import OptimConfig, build_optimizer


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

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "deepspeed"):
            raise ValueError(f"engine.backend must be torch or deepspeed, got {self.backend!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 0-3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("engine batch sizes must be >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"engine.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        self.precision = precision_name(self.precision, "engine.precision", training=True)
        if self.backend != "deepspeed" and (self.offload_optimizer or self.deepspeed_config):
            key = "engine.offload_optimizer" if self.offload_optimizer else "engine.deepspeed_config"
            raise ValueError(f"{key} needs a DeepSpeed engine (engine=zero1|zero2|zero3), got engine.backend=torch")
        if self.rehearse_memory and self.backend == "deepspeed" and self.zero_stage == 0:
            raise ValueError("engine.rehearse_memory=true needs the torch engine or ZeRO stage 1-3 (DeepSpeed without "
                             "ZeRO does not drop a step whose gradients are not finite)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs ZeRO stage 1, 2 or 3")

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

    def save(self, path: Path) -> None: ...

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
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.step_applied = math.isfinite(norm)
        if self.step_applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def dropped_step(self):
        return contextlib.nullcontext()  # a dropped step leaves the optimizer and the schedule as they were

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, path / "engine.pt")

    def load(self, path: Path, saved_world: int | None = None) -> None:
        """Model, optimizer and schedule are replicated, so any process count can resume them."""
        state = torch.load(path / "engine.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self):
        return None  # the module's own state dict is complete

    def close(self, ended: bool) -> None:
        pass  # DDP's reducer goes with the engine


# ---- DeepSpeed -------------------------------------------------------------------------------------

class DeepSpeedEngine:
    """DeepSpeed ZeRO-1/2/3 with a config generated from EngineConfig (merged with the user's JSON).

    The optimizer is handed in: torch AdamW, or DeepSpeed's CPU Adam under ZeRO-Offload (DeepSpeed
    refuses a client torch optimizer there). ``gradient_accumulation_steps`` = micro steps per
    optimizer step, so DeepSpeed reduces gradients and steps exactly at our boundary; losses reach
    ``backward`` already scaled (``scale_wrt_gas=False``), which is what GradCache needs."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int,
                 precision: str = "fp32") -> None:
        import deepspeed

        if not torch.cuda.is_available():
            # the shm all-reduce op JIT-compiles for ~1 min on first use and gloo does not need it
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        dist.init(single_process=True)  # DeepSpeed needs a process group even for one process
        self.cfg = cfg
        self.precision = precision
        world = dist.world_size()
        self.gas = cfg.micro_steps(world)
        self.ds_config = deepspeed_config(cfg, world, precision)
        make = None
        if offloads_optimizer(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            def make(groups, lr, betas, eps):
                return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
        opt, sched = build_optimizer(model.named_parameters(), optim, total_steps, make=make, drop_empty=True)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config)
        self._zero3 = cfg.zero_stage == 3
        self._deepspeed = deepspeed
        self.step_applied = True

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, **batch):
        return self.engine(**batch)  # DeepSpeed applies the torch_autocast section here

    @contextlib.contextmanager
    def micro(self, last: bool):
        """The accumulation boundary is set for each micro-step (``last``), not counted from the
        configured accumulation steps: token-budget micro batches vary in number from step to step.
        A micro-step that is not the last ends with DeepSpeed's ``step()``, which off the boundary
        only advances its counter (no optimizer step). The boundary's call is ``step``."""
        self.engine.set_gradient_accumulation_boundary(last)
        yield
        if not last:
            self.engine.step()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """The optimizer step at the accumulation boundary (reduce, clip, update, schedule)."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called before the last micro-step of the batch")
        self.engine.step()
        # ZeRO-1/2/3 drop a step whose gradients' norm is not finite (no update, no schedule step)
        self.step_applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @contextlib.contextmanager
    def dropped_step(self):
        """DeepSpeed counts a dropped (overflowed) step in its own counters: they are put back, so the
        memory rehearsal's step leaves no trace (the weights, moments and schedule it leaves alone itself)."""
        keys = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
        saved = {k: getattr(self.engine, k) for k in keys if hasattr(self.engine, k)}
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self.engine, k, v)

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load(self, path: Path, saved_world: int | None = None) -> None:
        """ZeRO partitions the weights' fp32 copy and the optimizer's moments by rank: a checkpoint written by
        another process count is first made whole (``_load_resharded``)."""
        world = dist.world_size()
        if saved_world is not None and saved_world != world and self.cfg.zero_stage > 0:
            self._load_resharded(path, saved_world, world)
            return
        self.engine.load_checkpoint(str(path), tag="deepspeed")

    def _load_resharded(self, path: Path, saved_world: int, world: int) -> None:
        """A ZeRO checkpoint of ``saved_world`` ranks resumed on ``world`` (train/reshard.py): converted into
        DeepSpeed's universal form by rank 0, beside the checkpoints, then each rank loads its slice."""
        from qwen3train.train import reshard

        out = path.parent.parent / f".resharded-{path.parent.name}"
        if dist.is_main():
            print(f"note: {path.parent} was written by {saved_world} processes; resharding its ZeRO-"
                  f"{self.cfg.zero_stage} state for {world} (DeepSpeed's universal checkpoint, in {out})", flush=True)
        failure = (f"resume with NGPU={saved_world} (x nodes), or start a new run from its weights with "
                   f"model.init_from={path.parent / 'model'} run.output_dir=<new folder>")
        universal = reshard.to_universal(path / "deepspeed", out, failure)
        config = self.engine._config
        own = reshard.hyperparameters(self.optimizer)
        config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            config.load_universal_checkpoint = False
        reshard.repair(self.optimizer, own)
        if dist.is_main():
            print(f"note: resharded in {reshard.seconds_taken(out):.0f} s; the run goes on from step "
                  f"{path.parent.name.split('_')[1].lstrip('0') or 0} on {world} process{'es' * (world > 1)}", flush=True)
        reshard.remove(out)

    def close(self, ended: bool) -> None:
        """DeepSpeed's objects hold the run's process groups to the end of the process: ZeRO-3 keeps the model in a
        module-level stack (``parameter_offload.FWD_MODULE_STACK``) that nothing empties, its parameters name their
        group, and DeepSpeed keeps a clone of the world group in ``deepspeed.utils.groups``. Held, the groups' gloo
        threads end in the interpreter's teardown, where a rank can abort after its work is done (SIGABRT: a 2-rank
        ZeRO-3 run in a CI simulation). Here the hooks go (``destroy``), the model leaves the stack, a class-level
        cache keyed by the model's parts is emptied and, when the run ``ended`` without an error, DeepSpeed's clone
        of the world group is destroyed and released (after an error a peer may be gone: DeepSpeed's references are
        dropped and the group ends with the default one at exit, ``dist``). Measured with DeepSpeed 0.19.8: no gloo
        thread left at exit. A failure here is a note, never the run's error: the results are written by now, and an
        exception already on its way stays the one reported."""
        try:
            self._let_go(ended)
        except Exception as e:  # noqa: BLE001 - see the docstring
            print(f"note: DeepSpeed's cleanup at the end of the run failed ({type(e).__name__}: {e}); the run's "
                  "output is unaffected", flush=True)

    def _let_go(self, ended: bool) -> None:
        module = self.engine.module
        group = getattr(self.engine, "data_parallel_group", None)
        self.engine.destroy()
        stack = importlib.import_module("deepspeed.runtime.zero.parameter_offload").FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not module]
        coordinator = importlib.import_module("deepspeed.runtime.zero.partitioned_param_coordinator")
        for fn in vars(coordinator.PartitionedParameterCoordinator).values():
            _clear_cache(fn)  # a class-level lru_cache keyed by (coordinator, submodule): it holds them all
        if group is None or not dist.is_dist() or dist.is_default_group(group):
            return
        if ended:
            self._deepspeed.comm.destroy_process_group(group)  # destroys it and drops DeepSpeed's references
        else:  # only the references: the group is destroyed with the others at exit (dist._destroy_at_exit)
            release = getattr(importlib.import_module("deepspeed.utils.groups"), "_release_process_group_references",
                              None)  # DeepSpeed 0.19.8 has it; where it is missing the clone stays held
            if release is not None:
                release(group)

    def full_state_dict(self):
        """Consolidated weights on rank 0 (ZeRO-3 partitions are gathered); None elsewhere."""
        if not self._zero3:
            return None
        params = list(self.engine.module.parameters())
        with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if dist.is_main():
                return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}
        return None


def _clear_cache(fn, depth: int = 3) -> None:
    """Clear the ``functools.lru_cache`` of ``fn`` or of a function its closure wraps (DeepSpeed's NVTX
    decorator wraps without ``functools.wraps``)."""
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()
    elif depth and callable(fn):
        for cell in getattr(fn, "__closure__", None) or ():
            _clear_cache(cell.cell_contents, depth - 1)


def build_engine(model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int, precision: str = "fp32"):
    if cfg.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg, optim, total_steps, precision)
    return TorchEngine(model, cfg, optim, total_steps, precision)


def before_process_group() -> None:
    """What must be imported before the process group exists: DeepSpeed's communication module, like torch's
    (``dist.init``), takes the default group as a default argument when imported, and imported after the group
    it holds it past ``destroy_process_group`` into the interpreter's teardown. Every training run imports it
    where it is installed (transformers' ``AutoModel`` loads its DeepSpeed integration), so first, here."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401
