"""EngineConfig and the two engines: plain torch (single process or DDP) and DeepSpeed ZeRO-1/2/3.

This is the only module that imports deepspeed, and only when ``engine.backend=deepspeed``.

Both engines expose the same small surface used by the loop:
  ``forward(**batch)``, ``micro(last)`` (context for one forward+backward), ``backward(loss)``,
  ``step() -> grad norm``, ``save(dir)`` / ``load(dir)``, ``full_state_dict()`` (rank 0), ``module``.
The loop calls ``backward`` once per micro-step (or per GradCache chunk) and ``step`` once per
optimizer step. Gradients from several backward calls add up; the loop scales the losses.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwen3train import dist
from qwen3train.train.schedule import OptimConfig, build_optimizer


@dataclass
class EngineConfig:
    """How a step is executed.

    global_batch_size: queries per optimizer step over all ranks. micro_batch_size: queries per rank
    in one forward/backward (or per GradCache chunk). Derived and checked: local batch =
    global / world, accumulation (or GradCache chunks) = local / micro.
    grad_cache: compute the loss over the whole global batch (all its in-batch negatives) while
    holding activations for one micro batch at a time; without it each micro step is its own batch.
    """

    backend: str = "torch"
    zero_stage: int = 2
    micro_batch_size: int = 8
    global_batch_size: int = 32
    grad_cache: bool = False
    bf16: bool = False
    grad_clip: float = 1.0
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "deepspeed"):
            raise ValueError(f"engine.backend must be torch or deepspeed, got {self.backend!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 0-3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("engine batch sizes must be >= 1")

    def local_batch(self, world: int) -> int:
        if self.global_batch_size % world:
            raise ValueError(f"engine.global_batch_size={self.global_batch_size} is not divisible by "
                             f"the {world} processes")
        return self.global_batch_size // world

    def micro_steps(self, world: int) -> int:
        local = self.local_batch(world)
        if local % self.micro_batch_size:
            raise ValueError(f"per-process batch {local} (engine.global_batch_size / {world} processes) is "
                             f"not divisible by engine.micro_batch_size={self.micro_batch_size}")
        return local // self.micro_batch_size


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


class TorchEngine:
    """Single process or DDP; AdamW + LambdaLR; gradient clipping; optional bf16 autocast on GPU."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.model = model.to(device())
        self.optimizer, self.scheduler = build_optimizer(model.named_parameters(), optim, total_steps)
        self.wrapped = model
        if dist.world_size() > 1:
            ids = [dist.local_rank()] if torch.cuda.is_available() else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.autocast = cfg.bf16 and torch.cuda.is_available()

    @property
    def module(self) -> nn.Module:
        return self.model

    def forward(self, **batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.wrapped(**batch)

    def micro(self, last: bool):
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "engine.pt", map_location=device(), weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self):
        return None  # the module's own state dict is complete


class DeepSpeedEngine:
    """DeepSpeed ZeRO-1/2/3 with a config generated from EngineConfig; a torch AdamW is passed in
    (no JIT-compiled FusedAdam on CPU). ``gradient_accumulation_steps`` = micro steps per optimizer
    step, so DeepSpeed reduces gradients and steps exactly at our boundary; losses reach
    ``backward`` already scaled (``scale_wrt_gas=False``), which is what GradCache needs."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int) -> None:
        import importlib

        import deepspeed

        if not torch.cuda.is_available():
            # the shm all-reduce op JIT-compiles for ~1 min on first use and gloo does not need it
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29512")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            if not dist.is_dist():
                torch.distributed.init_process_group("gloo")
        self.cfg = cfg
        world = dist.world_size()
        self.gas = cfg.micro_steps(world)
        ds_config = self.ds_config(cfg, world)
        opt, sched = build_optimizer(model.named_parameters(), optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self._zero3 = cfg.zero_stage == 3
        self._deepspeed = deepspeed

    @staticmethod
    def ds_config(cfg: EngineConfig, world: int) -> dict:
        gas = cfg.micro_steps(world)
        zero = {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {
            "train_batch_size": cfg.micro_batch_size * gas * world,
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": gas,
            "gradient_clipping": cfg.grad_clip,
            "bf16": {"enabled": cfg.bf16},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, **batch):
        return self.engine(**batch)

    def micro(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="deepspeed")

    def full_state_dict(self):
        """Consolidated weights on rank 0 (ZeRO-3 partitions are gathered); None elsewhere."""
        if not self._zero3:
            return None
        params = list(self.engine.module.parameters())
        with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if dist.is_main():
                return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}
        return None


def build_engine(model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int):
    if cfg.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg, optim, total_steps)
    return TorchEngine(model, cfg, optim, total_steps)
