"""Builders: a typed TrainConfig -> task (model + loss + data source)."""

from __future__ import annotations

from pathlib import Path

from qwen3train.data.sources import IndexedSource, expand_files
from qwen3train.losses import build_loss
from qwen3train.losses.rerank import RerankLossConfig
from qwen3train.models.build import build_embedder, build_reranker
from qwen3train.models.reranker import DEFAULT_RERANK_INSTRUCTION
from qwen3train.train.rerank_task import RerankTask
from qwen3train.train.task import EmbeddingTask


def build_task(cfg, run_dir, train_precision: str = "fp32"):
    """``train_precision``: the run's compute precision (``qwen3train.precision``); trainable
    weights are loaded in float32 whatever ``model.dtype`` says, exports are written in ``model.dtype``."""
    run_dir = Path(run_dir)
    data = cfg.data
    rejects = data.rejects_file or str(run_dir / "rejects.jsonl")
    source = IndexedSource(expand_files(data.train_files), num_hard_negatives=data.num_hard_negatives,
                           on_error=data.on_error, rejects_path=rejects)
    if isinstance(cfg.loss, RerankLossConfig):  # the reranker track: same loop, another task
        reranker = build_reranker(cfg.model, max_length=cfg.model.max_doc_length, train_precision=train_precision)
        return RerankTask(reranker, build_loss(cfg.loss), source, data, DEFAULT_RERANK_INSTRUCTION, cfg.run.seed)
    embedder = build_embedder(cfg.model, train_precision=train_precision)
    return EmbeddingTask(embedder, build_loss(cfg.loss), source, data, cfg.model.default_instruction,
                         cfg.run.seed)


def flops_per_token(module) -> float:
    """Training FLOPs per token, 6 x non-embedding parameters (PaLM's model-FLOPs convention)."""
    n = 0
    for name, p in module.named_parameters():
        if "embed_tokens" not in name:
            n += p.numel()
    return 6.0 * n
