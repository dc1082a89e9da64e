"""Ranking metrics as pure functions, with trec_eval's conventions (as BEIR and MTEB report them).

``run``: query id -> list of (doc id, score); ``qrels``: query id -> {doc id: graded relevance}.
Ties in score are broken by doc id (descending), as trec_eval does. nDCG uses linear gain and a
log2 discount; the ideal ranking uses all judged relevant documents of the query. Queries without a
positive judgment are skipped by the callers (as BEIR does).
"""

from __future__ import annotations

import math


def ranked(docs: list[tuple[str, float]]) -> list[str]:
    return [d for d, _ in sorted(docs, key=lambda x: (x[1], x[0]), reverse=True)]


def ndcg_at_k(ranking: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]) if rels.get(d, 0) > 0)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: list[str], rels: dict[str, int], k: int) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant & set(ranking[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranking: list[str], rels: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranking[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_run(run: dict[str, list[tuple[str, float]]], qrels: dict[str, dict[str, int]],
                 per_query: bool = False) -> dict:
    """Mean nDCG@10, Recall@100 and MRR@10 over the queries that have a positive judgment; with
    ``per_query`` also ``per_query: {metric: [value per judged query, in qrels order]}`` (paired tests)."""
    scores = {"ndcg@10": [], "recall@100": [], "mrr@10": []}
    for qid, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        ranking = ranked(run.get(qid, []))
        scores["ndcg@10"].append(ndcg_at_k(ranking, rels, 10))
        scores["recall@100"].append(recall_at_k(ranking, rels, 100))
        scores["mrr@10"].append(mrr_at_k(ranking, rels, 10))
    out = {k: sum(v) / len(v) if v else 0.0 for k, v in scores.items()}
    out["queries"] = len(scores["ndcg@10"])
    if per_query:
        out["per_query"] = scores
    return out


def drop_identical_ids(run: dict[str, list[tuple[str, float]]], k: int | None = None) -> dict[str, list[tuple[str, float]]]:
    """BEIR's ``ignore_identical_ids``: a document whose id is the query's own id is not a result (ArguAna,
    Quora, CQADupStack hold each query in the corpus under the same id); ``k`` cuts each list after."""
    return {q: [x for x in docs if x[0] != q][:k] for q, docs in run.items()}


def shares_ids(queries, corpus) -> bool:
    """Whether any query id is also a document id (where ``ignore_identical_ids`` matters)."""
    return not set(queries).isdisjoint(corpus)


def write_trec_run(run: dict[str, list[tuple[str, float]]], path, tag: str) -> None:
    """A run file in TREC format (``qid Q0 docid rank score tag``), each query's documents in the order the
    metrics rank them (score, then doc id, both descending): usable with trec_eval, ranx, ir_measures."""
    from pathlib import Path

    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag) or "run"
    lines = []
    for qid, docs in run.items():
        scores = dict(docs)
        for rank, d in enumerate(ranked(docs), 1):
            lines.append(f"{qid} Q0 {d} {rank} {scores[d]:.8g} {tag}\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(lines))


def paired_bootstrap(a, b, samples: int = 2000, seed: int = 0) -> float:
    """P(mean(a) > mean(b)) over ``samples`` resamplings of the paired per-query values (queries drawn with
    replacement, the same draw for both systems): how sure a higher dev mean is not luck of the queries."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:  # a length-1 list would broadcast silently
        raise ValueError("paired_bootstrap needs two equal-length, non-empty lists of per-query values")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(samples, len(d)))
    return float((d[idx].mean(axis=1) > 0).mean())
