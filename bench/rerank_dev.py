"""Reranker budgets chosen on the dev split (never on the evaluation sets): a dev collection from
``outputs/data/real/dev_select.jsonl`` (120 queries, one positive each, their 120 positives as the corpus),
a first-stage embedder's top 10 reranked by each given reranker checkpoint, nDCG@10 before and after.

    .venv/bin/python bench/rerank_dev.py [--length N] [--fusion] FIRST_STAGE RERANKER [RERANKER ...]

``--length``: the reranker's whole-prompt budget (default 128; the first stage always reads 128 tokens).
``--fusion``: also nDCG@10 of the fused score (``qwen3train.eval.rerank.fuse``) at reranker weights 0, 0.1 .. 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from qwen3train.eval.rerank import evaluate_rerank, fusion_curve, pairs_collection

    args = sys.argv[1:]
    length, grid = 128, False
    while args[:1] in (["--length"], ["--fusion"]):
        if args[0] == "--length":
            length, args = int(args[1]), args[2:]
        else:
            grid, args = True, args[1:]
    first, rerankers = args[0], args[1:]
    col = pairs_collection(REPO / "outputs" / "data" / "real" / "dev_select.jsonl")  # what the pipeline chooses on
    for rr in rerankers:
        r = evaluate_rerank(first, rr, col, top_k=10, max_length=128, precision="auto", rerank_max_length=length)
        row = {"reranker": rr, "length": length, "before": round(r["before"]["ndcg@10"], 4),
               "after": round(r["after"]["ndcg@10"], 4)}
        if grid:  # the reranker's weight in the fused score, 0 (first stage) .. 1 (reranker alone)
            row["fused"] = {w: round(v, 4) for w, v in fusion_curve(r, col.qrels).items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
