"""Registration of the primary config schemas (one per command) in Hydra's ConfigStore.

The schemas live beside their code (``train/config.py``, ``pipeline.py``, ``mining/mine.py``, ...);
this file only lists them, so it imports them and nothing in the package imports it (except the CLI):
no import cycle."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from qwen3train.losses.infonce import InfoNCEConfig
from qwen3train.losses.rerank import RerankLossConfig
from qwen3train.train.config import RunConfig, TrainConfig  # noqa: F401  (re-exported for users' scripts)


def _primaries() -> dict[str, tuple[type, str]]:
    """schema name -> (dataclass, "module:function" that runs it)."""
    from qwen3train.data.prepare import PrepareConfig
    from qwen3train.eval.mteb_eval import MtebConfig
    from qwen3train.eval.run import EvalConfig
    from qwen3train.merge.apply import MergeConfig
    from qwen3train.mining.filter import FilterConfig
    from qwen3train.mining.mine import MineConfig
    from qwen3train.mining.teacher import ScoreConfig
    from qwen3train.pipeline import PipelineConfig
    from qwen3train.synth.pipeline import SynthConfig

    return {
        "train_schema": (TrainConfig, "qwen3train.train.loop:run"),
        "synth_schema": (SynthConfig, "qwen3train.synth.pipeline:run"),
        "filter_schema": (FilterConfig, "qwen3train.mining.filter:run_filter"),
        "mine_schema": (MineConfig, "qwen3train.mining.mine:run_mine"),
        "score_schema": (ScoreConfig, "qwen3train.mining.teacher:run_score"),
        "prepare_schema": (PrepareConfig, "qwen3train.data.prepare:run_prepare"),
        "merge_schema": (MergeConfig, "qwen3train.merge.run:run"),
        "eval_schema": (EvalConfig, "qwen3train.eval.run:run"),
        "mteb_schema": (MtebConfig, "qwen3train.eval.mteb_eval:run"),
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
