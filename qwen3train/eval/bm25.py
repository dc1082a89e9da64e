"""BM25, the lexical baseline every retrieval table needs, computed in the same run as the embedders.

Implementation: the ``bm25s`` library (pip install bm25s). Settings, fixed and reported with the figures:
Lucene's BM25 variant (idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term weight
tf / (tf + k1 (1 - b + b dl / avgdl)) as Lucene >= 8 writes it), k1 = 1.5, b = 0.75; tokens are
lower-cased words from bm25s's default pattern, English stop words removed, no stemming (so the
same settings serve the Arabic collection). The run is scored exactly as the embedders' runs are.
"""

from __future__ import annotations

from pathlib import Path

from qwen3train.data.jsonl import read_jsonl
from qwen3train.eval.metrics import drop_identical_ids, evaluate_run, shares_ids

SETTINGS = {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en", "stemmer": None}
LABEL = "BM25 (bm25s, lucene k1=1.5 b=0.75)"


def bm25_run(doc_ids: list[str], docs: list[str], queries: dict[str, str], k: int = 100):
    """-> run: qid -> [(doc id, score)], best first, at most ``k`` documents with a positive score."""
    try:
        import bm25s
    except ModuleNotFoundError:
        from qwen3train.errors import ConfigError

        raise ConfigError("eval.bm25=true needs the bm25s package: pip install 'qwen3train[eval]'") from None

    retriever = bm25s.BM25(method=SETTINGS["method"], k1=SETTINGS["k1"], b=SETTINGS["b"])
    retriever.index(bm25s.tokenize(docs, stopwords=SETTINGS["stopwords"], show_progress=False), show_progress=False)
    qids = list(queries)
    q_tok = bm25s.tokenize([queries[q] for q in qids], stopwords=SETTINGS["stopwords"], show_progress=False)
    k = min(k, len(docs))
    idx, scores = retriever.retrieve(q_tok, k=k, show_progress=False, n_threads=1)
    run = {}
    for i, q in enumerate(qids):
        run[q] = [(doc_ids[int(j)], float(s)) for j, s in zip(idx[i], scores[i]) if s > 0]
    return run


def evaluate_collection_bm25(collection, ignore_identical_ids: bool | None = None) -> dict:
    from qwen3train.data.collections import Collection, load_collection

    col = collection if isinstance(collection, Collection) else load_collection(collection)
    qids = [q for q, r in col.qrels.items() if any(v > 0 for v in r.values())]
    dids = list(col.corpus)
    ignore = shares_ids(col.queries, col.corpus) if ignore_identical_ids is None else ignore_identical_ids
    run = bm25_run(dids, [col.corpus[d] for d in dids], {q: col.queries[q] for q in qids}, k=100 + int(ignore))
    if ignore:
        run = drop_identical_ids(run, 100)
    res = evaluate_run(run, col.qrels)
    res.update(dataset=col.name, model=LABEL, run=run)
    return res


def evaluate_pairs_bm25(pairs_file: str | Path) -> dict:
    """Held-out pairs as ``eval.pairs`` scores them: each query against the pool of the file's positives."""
    rows = read_jsonl(pairs_file)
    docs = sorted({p for r in rows for p in r["pos"]})
    doc_id = {d: str(i) for i, d in enumerate(docs)}
    run = bm25_run([doc_id[d] for d in docs], docs, {str(i): r["query"] for i, r in enumerate(rows)})
    qrels = {str(i): {doc_id[p]: 1 for p in r["pos"]} for i, r in enumerate(rows)}
    return evaluate_run(run, qrels)
