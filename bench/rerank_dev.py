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


def dev_collection(src: Path, out: Path) -> Path:
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    docs = {}
    with open(out / "queries.jsonl", "w") as fq, open(out / "qrels" / "test.tsv", "w") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for i, r in enumerate(rows):
            d = docs.setdefault(r["pos"][0], f"d{len(docs)}")
            fq.write(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n")
            fr.write(f"q{i}\t{d}\t1\n")
    with open(out / "corpus.jsonl", "w") as fc:
        for text, d in docs.items():
            fc.write(json.dumps({"_id": d, "text": text}) + "\n")
    return out


def main() -> None:
    from qwen3train.data.collections import load_collection
    from qwen3train.eval.rerank import evaluate_rerank

    from qwen3train.eval.metrics import evaluate_run
    from qwen3train.eval.rerank import fuse

    args = sys.argv[1:]
    length, grid = 128, False
    while args[:1] in (["--length"], ["--fusion"]):
        if args[0] == "--length":
            length, args = int(args[1]), args[2:]
        else:
            grid, args = True, args[1:]
    first, rerankers = args[0], args[1:]
    col = dev_collection(REPO / "outputs" / "data" / "real" / "dev_select.jsonl", REPO / "outputs" / "exp" / "dev_col")
    for rr in rerankers:
        r = evaluate_rerank(first, rr, str(col), top_k=10, max_length=128, precision="auto",
                            rerank_max_length=length)
        row = {"reranker": rr, "length": length, "before": round(r["before"]["ndcg@10"], 4),
               "after": round(r["after"]["ndcg@10"], 4)}
        if grid:  # the reranker's weight in the fused score, 0 (first stage) .. 1 (reranker alone)
            qrels = load_collection(str(col)).qrels
            row["fused"] = {w / 10: round(evaluate_run(fuse(r["first_run"], r["reranker_run"], w / 10), qrels)["ndcg@10"], 4)
                            for w in range(11)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
