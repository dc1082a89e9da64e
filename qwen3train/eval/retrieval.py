"""Retrieval evaluation of any embedder on a BEIR/TREC collection: exact search over the whole
corpus (chunked), scored with trec_eval's conventions (nDCG@10, Recall@100, MRR@10)."""

from __future__ import annotations

from pathlib import Path

from qwen3train.data.collections import Collection, load_collection
from qwen3train.data.instructions import REGISTRY
from qwen3train.eval.encoder import Encoder
from qwen3train.eval.metrics import drop_identical_ids, evaluate_run, shares_ids
from qwen3train.eval.search import topk
from qwen3train.text import DEFAULT_INSTRUCTION


def collection_instruction(col: Collection) -> str:
    """The query instruction for a collection: its own from the registry, else the default web-search one
    (the same rule for the embedder's evaluation and a reranker's first stage)."""
    return REGISTRY.get(col.name.split("@")[0].lower(), DEFAULT_INSTRUCTION)


def retrieve(encoder: Encoder, col: Collection, instruction: str | None, k: int = 100,
             cache_dir: str | None = None, ignore_identical_ids: bool | None = None):
    """-> run: qid -> [(doc id, score)] for the queries that have a positive judgment.

    ``ignore_identical_ids`` (BEIR's): drop a document whose id is the query's; None = where the
    collection shares ids between queries and documents."""
    qids = [q for q, r in col.qrels.items() if any(v > 0 for v in r.values())]
    dids = list(col.corpus)
    ignore = shares_ids(col.queries, col.corpus) if ignore_identical_ids is None else ignore_identical_ids
    dvec = encoder.cached_docs([col.corpus[d] for d in dids], cache_dir)
    qvec = encoder.encode_queries([col.queries[q] for q in qids], instruction)
    scores, idx = topk(qvec, dvec, min(k + int(ignore), len(dids)))
    run = {q: [(dids[j], float(s)) for s, j in zip(scores[i].tolist(), idx[i].tolist())] for i, q in enumerate(qids)}
    return drop_identical_ids(run, k) if ignore else run


def evaluate_collection(model: str | Path, collection: str | Path | Collection, *, instruction: str | None = None,
                        dim: int | None = None, max_length: int = 512, cache_dir: str | None = None,
                        encoder: Encoder | None = None, ignore_identical_ids: bool | None = None) -> dict:
    """Metrics of ``model`` on the collection; the run itself is in the result under ``"run"``."""
    col = collection if isinstance(collection, Collection) else load_collection(collection)
    enc = encoder or Encoder(model, max_length=max_length, dim=dim)
    instr = instruction or collection_instruction(col)
    run = retrieve(enc, col, instr, 100, cache_dir, ignore_identical_ids)
    res = evaluate_run(run, col.qrels)
    res.update(dataset=col.name, model=str(model), dim=dim, run=run, **col.missing)
    return res
