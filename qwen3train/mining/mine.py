"""Hard-negative mining: encode a corpus once (cached), exact top-k in chunks, sample negatives from
a rank window, guard against false negatives, optionally rescore with a reranker.

For each query: candidates = top ``range_max`` documents by cosine; drop ranks before ``range_min``,
the query's positives (by text), and any candidate scoring above ``max_score_ratio * s(q, d+)``
(NV-Retriever's relative rule) or above ``s(q, d+) - margin`` when ``margin`` is set; optionally a
reranker drops candidates it judges relevant (probability > ``rerank_max_prob``). Then ``num_negatives``
are taken (``top`` or seeded ``random``). Output: the input records with ``neg`` and ``neg_scores``
(and ``pos_score``); records left with no negative are counted and written without ``neg`` to
``no_negatives.jsonl``. Memory is bounded by the embedding matrix and one score chunk.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3train.data.instructions import resolve_instruction
from qwen3train.data.sources import IndexedSource, expand_files
from qwen3train.eval.encoder import Encoder
from qwen3train.eval.search import topk, topk_faiss
from qwen3train.text import DEFAULT_INSTRUCTION


@dataclass
class MineConfig:
    inputs: list[str]
    corpus: list[str] | None = None  # BEIR corpus.jsonl / JSONL with "text"; default: every positive of the inputs
    embedder: str = "outputs/stage1/final"
    output: str = "outputs/mine/mined.jsonl"
    cache_dir: str | None = "outputs/cache/embeddings"
    num_negatives: int = 7
    range_min: int = 0
    range_max: int = 50
    max_score_ratio: float | None = 0.95
    margin: float | None = None
    sampling: str = "top"
    reranker: str | None = None
    rerank_max_prob: float = 0.5
    use_faiss: bool = False
    max_length: int = 512
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampling not in ("top", "random"):
            raise ValueError("mine.sampling must be top or random")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError("mine needs 0 <= range_min < range_max")


def load_corpus(paths: list[str]) -> list[str]:
    """Document texts of JSONL / Parquet / text files (the stage-0 corpus reader; title prepended)."""
    from qwen3train.synth.corpus import read_documents

    return [text for _, text, _ in read_documents(expand_files(paths), "English")]


def select_negatives(cands: list[tuple[int, float]], pos_texts: set[str], pos_score: float, docs: list[str],
                     cfg: MineConfig) -> tuple[list[int], dict]:
    """Apply the window and the false-negative guards to one query's ranked candidates."""
    dropped = defaultdict(int)
    keep = []
    for rank, (j, s) in enumerate(cands):
        if rank < cfg.range_min:
            dropped["rank_window"] += 1
        elif docs[j] in pos_texts:
            dropped["is_positive"] += 1
        elif cfg.max_score_ratio is not None and s > cfg.max_score_ratio * pos_score:
            dropped["above_ratio"] += 1
        elif cfg.margin is not None and s > pos_score - cfg.margin:
            dropped["within_margin"] += 1
        else:
            keep.append(rank)
    return keep, dropped


def run_mine(cfg: MineConfig) -> dict:
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = IndexedSource(expand_files(cfg.inputs), on_error="skip", rejects_path=out.parent / "rejects.jsonl")
    records = [source[i] for i in range(len(source))]
    docs = load_corpus(cfg.corpus) if cfg.corpus else sorted({p for r in records for p in r.pos})
    docs = list(dict.fromkeys(docs))  # identical texts once
    enc = Encoder(cfg.embedder, max_length=cfg.max_length, batch_size=cfg.batch_size)
    dvec = enc.cached_docs(docs, cfg.cache_dir)
    by_instr: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_instr[resolve_instruction(r.task, r.instruction, {}, DEFAULT_INSTRUCTION)].append(i)
    qvec = torch.empty((len(records), dvec.shape[1]))
    for instr, ids in by_instr.items():
        qvec[ids] = enc.encode_queries([records[i].query for i in ids], instr)
    search = topk_faiss if cfg.use_faiss else topk
    scores, idx = search(qvec, dvec, cfg.range_max)
    # positives already in the corpus reuse its embeddings; only the others are encoded
    where = {t: j for j, t in enumerate(docs)}
    missing = sorted({r.pos[0] for r in records if r.pos[0] not in where})
    extra = enc.encode_docs(missing) if missing else dvec[:0]
    where.update({t: len(docs) + j for j, t in enumerate(missing)})
    pvec = torch.cat([dvec, extra])[[where[r.pos[0]] for r in records]]
    pos_scores = (qvec * pvec).sum(1)
    reranker = None
    if cfg.reranker:
        from qwen3train.models.build import ModelConfig, build_reranker

        reranker = build_reranker(ModelConfig(name_or_path=cfg.reranker, padding_side="left"))
    stats = defaultdict(int)
    rng = np.random.default_rng(cfg.seed)
    tmp, tmp_none = out.with_suffix(".tmp"), out.with_name(".no_negatives.tmp")
    with open(tmp, "w", encoding="utf-8") as f, open(tmp_none, "w", encoding="utf-8") as fnone:
        for i, r in enumerate(records):
            cands = list(zip(idx[i].tolist(), scores[i].tolist()))
            keep, dropped = select_negatives(cands, set(r.pos), float(pos_scores[i]), docs, cfg)
            for k, v in dropped.items():
                stats[f"dropped_{k}"] += v
            if reranker is not None and keep:
                probs = reranker.score(r.query, [docs[cands[k][0]] for k in keep], instruction=r.instruction)
                stats["dropped_reranker"] += int((probs > cfg.rerank_max_prob).sum())
                keep = [k for k, p in zip(keep, probs.tolist()) if p <= cfg.rerank_max_prob]
            if cfg.sampling == "random" and len(keep) > cfg.num_negatives:
                keep = sorted(rng.choice(keep, cfg.num_negatives, replace=False).tolist())
            keep = keep[:cfg.num_negatives]
            row = {"query": r.query, "pos": r.pos, "task": r.task, "instruction": r.instruction,
                   "pos_score": round(float(pos_scores[i]), 6)}
            if r.type:
                row["type"] = r.type
            if not keep:
                stats["no_negatives"] += 1
                fnone.write(json.dumps(row, ensure_ascii=False) + "\n")
                continue
            row["neg"] = [docs[cands[k][0]] for k in keep]
            row["neg_scores"] = [round(cands[k][1], 6) for k in keep]
            row["neg_ranks"] = keep
            stats["records_with_negatives"] += 1
            stats["negatives"] += len(keep)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    tmp_none.replace(out.with_name("no_negatives.jsonl"))
    summary = {"records": len(records), "corpus": len(docs), "embedder": cfg.embedder, **stats,
               "skipped_bad_records": sum(source.rejected.values())}
    out.with_name("mine_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
