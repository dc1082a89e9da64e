"""Builders: a typed TrainConfig -> the task (model + loss + export) and the loader (data path)."""

from __future__ import annotations

from pathlib import Path

from qwen3train import dist
from qwen3train.data.collate import EmbeddingCollator, RerankCollator
from qwen3train.data.instructions import Instructions
from qwen3train.data.loader import Loader
from qwen3train.data import hf
from qwen3train.data.sources import IndexedSource, MixtureSource, expand_files
from qwen3train.errors import ConfigError
from qwen3train.losses import build_loss
from qwen3train.losses.rerank import RerankLossConfig
from qwen3train.models.build import build_embedder, build_reranker
from qwen3train.models.reranker import DEFAULT_RERANK_INSTRUCTION


def build_sources(cfg, run_dir) -> tuple[list, list[float]]:
    """The training sources and their weights: ``data.train_files`` (one source) or ``data.mixture``
    (files, or ``datasets`` sources: indexed Arrow or streamed; ``qwen3train.data.hf``)."""
    data = cfg.data
    parts = list(data.mixture) or [MixtureSource(files=list(data.train_files))]
    rejects = Path(data.rejects_file or Path(run_dir) / "rejects.jsonl")
    kw = dict(num_hard_negatives=data.num_hard_negatives, on_error=data.on_error)
    sources = []
    for k, m in enumerate(parts):
        rej = rejects if len(parts) == 1 else rejects.with_name(f"{rejects.stem}.source{k}{rejects.suffix}")
        if m.dataset and m.streaming:
            if cfg.run.max_steps <= 0:
                raise ConfigError(f"{hf.label(m)} is streamed (its length is unknown): set run.max_steps")
            sources.append(hf.StreamingSource(m, seed=cfg.run.seed, rank=dist.rank(), world=dist.world_size(),
                                              rejects_path=rej, shuffle_buffer=m.shuffle_buffer,
                                              retries=data.stream_retries, **kw))
            continue
        inputs = [hf.ref(m)] if m.dataset else expand_files(m.files)
        sources.append(IndexedSource(inputs, rejects_path=rej, index_dir=data.index_dir, **kw))
    return sources, [m.weight for m in parts]


ZERO3_COMPILE = ("DeepSpeed ZeRO-3 gathers and frees each submodule's weights in hooks that run inside a compiled "
                 "layer: dynamo traces them, breaks the graph at each and recompiles every layer to its limit, then "
                 "runs it eagerly (50 recompilations a process in 2 steps of the tiny model, measured on CPU)")


def compile_under(model, engine):
    """``model.compile`` as the engine can use it: under ZeRO-3 compiled layers cost compilation and give nothing back
    (``ZERO3_COMPILE``), so auto (null) is off there, said once on CUDA (where auto would be on); an explicit true is
    kept, with a warning. -> the ModelConfig to build with (the run's own config keeps what it says)."""
    from dataclasses import replace

    if not (engine.backend == "deepspeed" and engine.zero_stage == 3) or model.compile is False:
        return model
    if model.compile is None:
        import torch

        if torch.cuda.is_available() and dist.is_main():
            print(f"note: model.compile (auto) is off under engine=zero3: {ZERO3_COMPILE}; engine=fsdp shards as "
                  "ZeRO-3 does and compiles", flush=True)
        return replace(model, compile=False)
    if dist.is_main():
        print(f"warning: model.compile=true under engine=zero3: {ZERO3_COMPILE}; model.compile=false, or "
              "engine=fsdp, which shards as ZeRO-3 does and compiles", flush=True)
    return model


def build_task(cfg, run_dir, train_precision: str = "fp32"):
    """-> (task, loader). ``train_precision``: the run's compute precision (``qwen3train.precision``);
    trainable weights are loaded in float32 whatever ``model.dtype`` says, exports are written in
    ``model.dtype``."""
    from qwen3train.train.rerank_task import RerankTask
    from qwen3train.train.task import EmbeddingTask

    data, seed = cfg.data, cfg.run.seed
    sources, weights = build_sources(cfg, run_dir)
    # FSDP over several processes: rank 0 reads the weights, the others build the model empty (train/fsdp_engine.py)
    empty = cfg.engine.broadcast_load(dist.world_size()) and not dist.is_main()
    partition = None  # ZeRO-3 over several processes: built partitioned, rank 0 reads (train/deepspeed_engine.py)
    if cfg.engine.partitioned_build(dist.world_size()):
        from qwen3train.train.deepspeed_engine import Zero3Build
        from qwen3train.train.ds_config import deepspeed_config

        partition = Zero3Build(deepspeed_config(cfg.engine, dist.world_size(), train_precision))
    model = compile_under(cfg.model, cfg.engine)
    loader_kw = dict(global_batch=cfg.engine.global_batch_size, seed=seed, rank=dist.rank(), world=dist.world_size(),
                     weights=weights)
    if isinstance(cfg.loss, RerankLossConfig):  # the reranker track: same loop, another task
        reranker = build_reranker(model, max_length=cfg.model.max_doc_length, train_precision=train_precision,
                                  empty=empty, partition=partition)
        instructions = Instructions(data.task_instructions, DEFAULT_RERANK_INSTRUCTION, data.symmetric_tasks)
        collate = RerankCollator(reranker.token_ids, instructions, k=data.num_hard_negatives, seed=seed,
                                 teacher=cfg.loss.kd_weight > 0)
        task = RerankTask(reranker, build_loss(cfg.loss))
        task.instructions = instructions  # the dev evaluation's instruction rule (train/dev_eval.py)
        return task, Loader(sources, collate, **loader_kw)
    embedder = build_embedder(model, train_precision=train_precision, empty=empty, partition=partition)
    instructions = Instructions(data.task_instructions, cfg.model.default_instruction, data.symmetric_tasks)
    collate = EmbeddingCollator(embedder.tok, instructions, k=data.num_hard_negatives, seed=seed,
                                max_query_length=embedder.max_query_length, max_doc_length=embedder.max_doc_length,
                                query_template=embedder.query_template, teacher=cfg.loss.kd_weight > 0)
    task = EmbeddingTask(embedder, build_loss(cfg.loss), cfg.model.default_instruction,
                         instructions.named([t for s in sources for t in s.task_names]))
    task.instructions = instructions
    return task, Loader(sources, collate, **loader_kw)


def flops_per_token(module) -> float:
    """Training FLOPs per token, 6 x non-embedding parameters (Kaplan et al.'s 6N). Attention's own matmuls, which
    PaLM's model-FLOPs count adds as 12 x layers x heads x head dim x sequence length per token, are left out: for
    Qwen3-0.6B 1.7 % more at 64-token and 6.7 % at 256-token sequences, so the MFU figures are slightly low."""
    n = 0
    for name, p in module.named_parameters():
        if "embed_tokens" not in name:
            n += getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partitioned parameter holds 1/N (or none)
    return 6.0 * n


def attention_flops(module, lengths) -> float:
    """Attention's own matmuls in a training step over sequences of these lengths, as PaLM's model FLOPs count
    them (what ``flops_per_token`` leaves out): scores and their weighted sum, forward and backward, 12 x layers x
    query heads x head dim x t for each token of a t-token sequence, so 12 L H Q sum(t^2) in all (causal masking
    not discounted). 0 where the module holds no transformer config."""
    cfg = next((m.config for m in module.modules() if hasattr(getattr(m, "config", None), "num_hidden_layers")), None)
    if cfg is None:
        return 0.0
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 12.0 * cfg.num_hidden_layers * heads * head_dim * float(sum(t * t for t in lengths))
