"""Root config schemas, composed from the component schemas that live beside their code, and their
registration in Hydra's ConfigStore. Modules never import this file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from qwen3train.data.sources import DataConfig
from qwen3train.losses.infonce import InfoNCEConfig
from qwen3train.models.build import ModelConfig
from qwen3train.train.engine import EngineConfig
from qwen3train.train.schedule import OptimConfig
from qwen3train.text import DEFAULT_INSTRUCTION


@dataclass
class RunConfig:
    """Where a run writes and how long it lasts.

    save_every: optimizer steps between checkpoints (0: only the final one). keep_last: how many
    recent checkpoints to keep; keep_every: also keep every n-th step's (the merge stage samples them).
    """

    name: str = "stage1"
    output_dir: str = "outputs/stage1"
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0
    save_every: int = 0
    keep_last: int = 2
    keep_every: int = 0
    export_checkpoints: bool = True
    resume: bool = True
    wandb: bool = False
    wandb_project: str = "qwen3train"
    export_instruction: str = DEFAULT_INSTRUCTION


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: Any = field(default_factory=InfoNCEConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def register_configs() -> None:
    """Register every primary schema (one per make target) and the per-option group schemas."""
    from qwen3train.merge.apply import MergeConfig
    from qwen3train.synth.pipeline import SynthConfig

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="merge_schema", node=MergeConfig)
    cs.store(name="synth_schema", node=SynthConfig)
    cs.store(group="loss", name="infonce_schema", node=InfoNCEConfig)
