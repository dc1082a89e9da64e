"""Reranking evaluation: a first-stage retriever's top-k on a BEIR/TREC collection, rescored by a
reranker; metrics before and after (as the paper evaluates on the top-100 of Qwen3-Embedding-0.6B)."""

from __future__ import annotations

from pathlib import Path

from qwen3train.data.collections import Collection, load_collection
from qwen3train.eval.encoder import Encoder, resolve_precision
from qwen3train.eval.metrics import evaluate_run
from qwen3train.eval.retrieval import collection_instruction, retrieve


def _unit(scores: list[float]) -> list[float]:
    lo, hi = min(scores), max(scores)
    return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in scores]


def fuse(first: dict[str, list[tuple[str, float]]], second: dict[str, list[tuple[str, float]]],
         weight: float) -> dict[str, list[tuple[str, float]]]:
    """Per query, each ranker's scores over the same candidates scaled to [0, 1] (min-max), then
    ``weight * reranker + (1 - weight) * first stage``: 1.0 is the reranker alone, 0.0 the first stage.
    The scales differ (cosines near each other vs probabilities near 0 or 1); min-max puts both on the
    candidates' own range, so the weight means the same for every query."""
    out = {}
    for qid, cands in first.items():
        theirs = dict(second[qid])
        docs = [d for d, _ in cands]
        a, b = _unit([s for _, s in cands]), _unit([theirs[d] for d in docs])
        out[qid] = [(d, weight * y + (1.0 - weight) * x) for d, x, y in zip(docs, a, b)]
    return out


def first_stage(retriever: str | Path, col: Collection, top_k: int, cache_dir: str | None, max_length: int,
                precision: str, ignore_identical_ids: bool | None) -> tuple[str, dict]:
    """(the query instruction, the retriever's top-k run): the first stage as make eval scores that embedder (its
    query instruction: the collection's, else the default; before, an unregistered collection's first-stage
    queries went without an instruction)."""
    instr = collection_instruction(col)
    enc = Encoder(retriever, max_length=max_length, precision=precision, label=f"first stage {col.name}")
    return instr, retrieve(enc, col, instr, top_k, cache_dir, ignore_identical_ids)


def load_reranker(reranker: str | Path, precision: str, max_length: int):
    import torch

    from qwen3train.models.build import ModelConfig, build_reranker

    rr = build_reranker(ModelConfig(name_or_path=str(reranker), padding_side="left", dtype=resolve_precision(precision)),
                        max_length=max_length)
    if torch.cuda.is_available():
        rr.cuda()
    return rr


def rerank(rr, col: Collection, first: dict, instr: str, qids, batch_size: int = 16, desc: str | None = None) -> dict:
    """The reranker's probabilities of each query's candidates (``qids``: the queries to score, a rank's share)."""
    from qwen3train.progress import Progress

    second = {}
    with Progress(len(qids), desc, "queries") as bar:
        for qid in qids:
            cands = first[qid]
            probs = rr.score(col.queries[qid], [col.corpus[d] for d, _ in cands], instruction=instr,
                             batch_size=batch_size)
            second[qid] = [(d, float(p)) for (d, _), p in zip(cands, probs.tolist())]
            bar.update()
    return second


def evaluate_rerank(retriever: str | Path, reranker: str | Path, collection, *, top_k: int = 100,
                    batch_size: int = 16, cache_dir: str | None = None, max_length: int = 512,
                    precision: str = "float32", ignore_identical_ids: bool | None = None,
                    rerank_max_length: int | None = None, fusion: float | None = None,
                    scores: dict | None = None) -> dict:
    """``max_length``: the first stage's token budget; ``rerank_max_length``: the reranker's whole prompt
    (template, instruction, query and the document, of which only the document is cut); None: ``max_length``.
    ``fusion``: the reranker's weight in a fused score (``fuse``); ``after`` is then the fused ranking's,
    ``alone`` the reranker's own. None: the reranker alone (the paper's use). ``scores``: the reranker's
    scores of this first stage already computed (``rerank`` on the processes of a multi-process evaluation)."""
    col = collection if isinstance(collection, Collection) else load_collection(collection)
    instr, first = first_stage(retriever, col, top_k, cache_dir, max_length, precision, ignore_identical_ids)
    if scores is not None:
        if {q: [d for d, _ in c] for q, c in scores.items()} != {q: [d for d, _ in c] for q, c in first.items()}:
            raise RuntimeError(f"reranker scores of {col.name} were computed on other candidates than its first stage")
        second = scores
    else:
        rr = load_reranker(reranker, precision, rerank_max_length or max_length)
        second = rerank(rr, col, first, instr, list(first), batch_size, f"rerank {col.name} top-{top_k}")
    before, alone = evaluate_run(first, col.qrels), evaluate_run(second, col.qrels)
    final = second if fusion is None else fuse(first, second, fusion)
    after = alone if fusion is None else evaluate_run(final, col.qrels)
    return {"dataset": col.name, "top_k": top_k, "before": before, "after": after, "alone": alone,
            "fusion": fusion, "delta_ndcg@10": after["ndcg@10"] - before["ndcg@10"], "run": final,
            "first_run": first, "reranker_run": second}


FUSION_GRID = tuple(i / 10 for i in range(11))


def pairs_collection(pairs_file: str | Path) -> Collection:
    """A pair file (query, positives) as a collection: every positive of the file is the corpus, as
    ``evaluate_pairs`` scores it; what the fusion weight is chosen on (the merge gate's dev pairs)."""
    from qwen3train.data.jsonl import read_jsonl

    rows = read_jsonl(pairs_file)
    doc_id = {d: f"d{i}" for i, d in enumerate(sorted({p for r in rows for p in r["pos"]}))}
    return Collection(name=f"dev:{Path(pairs_file).stem}", corpus={i: d for d, i in doc_id.items()},
                      queries={f"q{i}": r["query"] for i, r in enumerate(rows)},
                      qrels={f"q{i}": {doc_id[p]: 1 for p in r["pos"]} for i, r in enumerate(rows)})


def fusion_curve(result: dict, qrels: dict[str, dict[str, int]]) -> dict[float, float]:
    """nDCG@10 of the fused ranking at each weight of ``FUSION_GRID``, from one ``evaluate_rerank`` result."""
    return {w: evaluate_run(fuse(result["first_run"], result["reranker_run"], w), qrels)["ndcg@10"]
            for w in FUSION_GRID}


def choose_fusion(retriever: str | Path, reranker: str | Path, dev_file: str | Path, **kw) -> dict:
    """The reranker's weight in the fused score, chosen on dev pairs (never on an evaluation set): the
    grid 0, 0.1 .. 1 scored by nDCG@10 of the first stage's top-k reordered; the best weight, the smaller
    one on a tie (closer to the first stage). Returns the weight and the whole dev curve."""
    col = pairs_collection(dev_file)
    curve = fusion_curve(evaluate_rerank(retriever, reranker, col, **kw), col.qrels)
    best = max(FUSION_GRID, key=lambda w: (curve[w], -w))
    return {"weight": best, "dev_file": str(dev_file), "queries": len(col.queries),
            "dev_ndcg@10": {f"{w:.1f}": round(v, 4) for w, v in curve.items()}}
