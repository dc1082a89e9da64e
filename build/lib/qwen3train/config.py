"""Root config schemas, composed from the component schemas that live beside their code, and their
registration in Hydra's ConfigStore. Modules never import this file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from qwen3train.data.sources import DataConfig
from qwen3train.losses.infonce import InfoNCEConfig
from qwen3train.losses.rerank import RerankLossConfig
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
    resume: str = "auto"  # auto: resume a run of the same config, refuse another; force; never (true/false too)
    wandb: bool = False
    wandb_project: str = "qwen3train"
    export_instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self) -> None:
        from qwen3train.train.identity import normalize_resume

        self.resume = normalize_resume(self.resume)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: Any = None  # a loss group option (InfoNCEConfig, RerankLossConfig): the type picks the task
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.loss, (InfoNCEConfig, RerankLossConfig)):
            raise ValueError("loss must be chosen from the loss group (loss=infonce or loss=rerank)")


def _primaries() -> dict[str, tuple[type, str]]:
    """schema name -> (dataclass, "module:function" that runs it)."""
    from qwen3train.data.prepare import PrepareConfig
    from qwen3train.eval.run import EvalConfig
    from qwen3train.merge.apply import MergeConfig
    from qwen3train.mining.filter import FilterConfig
    from qwen3train.mining.mine import MineConfig
    from qwen3train.pipeline import PipelineConfig
    from qwen3train.synth.pipeline import SynthConfig

    return {
        "train_schema": (TrainConfig, "qwen3train.train.loop:run"),
        "synth_schema": (SynthConfig, "qwen3train.synth.pipeline:run"),
        "filter_schema": (FilterConfig, "qwen3train.mining.filter:run_filter"),
        "mine_schema": (MineConfig, "qwen3train.mining.mine:run_mine"),
        "prepare_schema": (PrepareConfig, "qwen3train.data.prepare:run_prepare"),
        "merge_schema": (MergeConfig, "qwen3train.merge.run:run"),
        "eval_schema": (EvalConfig, "qwen3train.eval.run:run"),
        "pipeline_schema": (PipelineConfig, "qwen3train.pipeline:run"),
    }


def register_configs() -> None:
    """Register every primary schema (one per make target) and the per-option group schemas."""
    cs = ConfigStore.instance()
    for name, (node, _) in _primaries().items():
        cs.store(name=name, node=node)
    cs.store(group="loss", name="infonce_schema", node=InfoNCEConfig)
    cs.store(group="loss", name="rerank_schema", node=RerankLossConfig)


def runner_for(cfg):
    """The function that runs a typed primary config."""
    import importlib

    for node, target in _primaries().values():
        if type(cfg) is node:
            module, fn = target.split(":")
            return getattr(importlib.import_module(module), fn)
    raise TypeError(f"no runner for {type(cfg).__name__}")
