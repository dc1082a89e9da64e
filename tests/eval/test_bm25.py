"""The BM25 baseline against an independent computation of Lucene's BM25 formula."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("bm25s")

from qwen3train.eval.bm25 import SETTINGS, bm25_run, evaluate_pairs_bm25  # noqa: E402

DOCS = ["rotary position embeddings encode position through rotation",
        "contrastive training pulls queries toward positive passages",
        "position interpolation extends rotary embeddings",
        "hard negatives sharpen contrastive training",
        "passages retrieved through lexical matching",
        "slerp merges checkpoints along great circles"]
QUERIES = {"q1": "rotary position", "q2": "contrastive negatives", "q3": "merges checkpoints slerp"}


def lucene_bm25(query: str, docs: list[str], k1: float, b: float) -> list[float]:
    toks = [d.lower().split() for d in docs]
    n, avgdl = len(toks), sum(map(len, toks)) / len(toks)
    scores = []
    for t in toks:
        s = 0.0
        for w in set(query.lower().split()):
            df = sum(w in d for d in toks)
            if df == 0 or w not in t:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = t.count(w)
            s += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))  # Lucene >= 8: no (k1 + 1) factor
        scores.append(s)
    return scores


def test_scores_and_order_equal_the_lucene_formula():
    """Catches another BM25 variant (ATIRE/Robertson idf, other k1/b), a lost document or a wrong id map."""
    ids = [f"d{i}" for i in range(len(DOCS))]
    run = bm25_run(ids, DOCS, QUERIES, k=10)
    for q, text in QUERIES.items():
        ref = lucene_bm25(text, DOCS, SETTINGS["k1"], SETTINGS["b"])
        want = sorted(((ids[i], s) for i, s in enumerate(ref) if s > 0), key=lambda x: -x[1])
        assert [d for d, _ in run[q]] == [d for d, _ in want], q
        for (_, got), (_, exp) in zip(run[q], want):
            assert got == pytest.approx(exp, rel=1e-5)


def test_pairs_file_scored_like_the_embedders(tmp_path):
    """Each query against the pool of the file's positives: a query sharing words with its own positive
    ranks it first (MRR 1); a query with no shared word scores 0 for that pair."""
    rows = [{"query": "rotary position", "pos": [DOCS[0]]}, {"query": "slerp checkpoints", "pos": [DOCS[5]]},
            {"query": "unrelated words entirely", "pos": [DOCS[4]]}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate_pairs_bm25(f)
    assert res["mrr@10"] == pytest.approx(2 / 3)
