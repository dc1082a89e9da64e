"""OptimConfig, AdamW and the learning-rate multiplier as a pure function of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine / linear decay (or constant) to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    # torch's fused AdamW (one kernel over all parameters) instead of its multi-tensor loop; null: fused where
    # every trainable parameter is on a CPU or a CUDA GPU (torch has both kernels), else the multi-tensor one.
    # Measured: SmolLM2-135M's 134M parameters on 2 CPU cores, 1.0-1.8 s a step multi-tensor vs 0.08 s fused
    # (a fifth of a reranker step in make pipeline); on an H100 the multi-tensor step was 25 ms of a 0.6B step.
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas) or self.eps < 0:
            raise ValueError(f"optim.betas must be two numbers in [0, 1) and optim.eps >= 0; got {list(self.betas)}, "
                             f"{self.eps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio is a share of optim.lr, in [0, 1]; got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), optim.warmup_steps and optim.weight_decay >= 0; "
                             f"got {self.warmup_ratio}, {self.warmup_steps}, {self.weight_decay}")


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(params, cfg: OptimConfig, total_steps: int, make=None, drop_empty: bool = False):
    """AdamW without weight decay on biases and norms; LambdaLR following ``lr_multiplier``.

    ``make(groups, lr, betas, eps)`` builds another AdamW implementation over the same groups
    (DeepSpeed's CPU Adam under ZeRO-Offload); default ``torch.optim.AdamW``. ``drop_empty``: leave out a group
    with no parameter (LoRA trains no bias or norm): DeepSpeed's ZeRO optimizers drop it and the schedule, which
    kept its learning rate, then fails at the first step (the torch engine keeps both groups, as its checkpoints
    have them)."""
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter: its whole shape
        (no_decay if len(shape) < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if drop_empty:
        groups = [g for g in groups if g["params"]]
    if make is None:
        fused = cfg.fused
        if fused is None:
            fused = bool(decay or no_decay) and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)

        def make(g, lr, betas, eps):
            return torch.optim.AdamW(g, lr=lr, betas=betas, eps=eps, fused=fused or None)
    opt = make(groups, cfg.lr, tuple(cfg.betas), cfg.eps)
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio))
    return opt, sched
