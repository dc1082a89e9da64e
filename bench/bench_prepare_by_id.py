"""`make prepare` on training rows that name their documents by id (Tevatron's README layout) joined with their
corpus, against the same rows with their passages written inline (Tevatron's hub layout, what a user would
otherwise convert to): peak memory and time, fresh processes, alternating. The corpus is read as a JSONL file
({docid, title, text}) and as MS MARCO's ``id<TAB>text``; only the documents the rows name are held.

    .venv/bin/python bench/bench_prepare_by_id.py [--docs 1000000] [--rows 100000] [--negatives 7] [--repeats 2]

Checks that every variant gives the same rows. Results: ``outputs/bench/prepare_by_id.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from alternate import run_alternating, save, summarise

ONE = """
import hashlib, json, resource, sys, time
from qwen3train.data.prepare import import_jsonl
root, variant = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter and the imports
t = time.perf_counter()
if variant == "inline":
    rows, stats = import_jsonl(root + "/inline.jsonl", "msmarco", None, "raise", fmt="tevatron")
else:
    corpus = root + ("/corpus.jsonl" if variant == "by-id-jsonl" else "/collection.tsv")
    rows, stats = import_jsonl(root + "/by_id.jsonl", "msmarco", None, "raise", fmt="tevatron", corpus=corpus)
secs = time.perf_counter() - t
digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base,
                  "seconds": secs, "rows": len(rows), "digest": digest}))
"""


def build(root: Path, docs: int, rows: int, negatives: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    texts = []
    with open(root / "corpus.jsonl", "w") as f, open(root / "collection.tsv", "w") as g:
        for i in range(docs):
            texts.append(" ".join(rng.choices(words, k=55)))
            f.write(json.dumps({"docid": f"d{i}", "title": "", "text": texts[-1]}) + "\n")
            g.write(f"d{i}\t{texts[-1]}\n")
    with open(root / "by_id.jsonl", "w") as f, open(root / "inline.jsonl", "w") as g:
        for q in range(rows):
            query = " ".join(rng.choices(words, k=8))
            pos, neg = [rng.randrange(docs)], rng.sample(range(docs), negatives)
            f.write(json.dumps({"query_id": f"q{q}", "query_text": query, "positive_document_ids": [f"d{d}" for d in pos],
                                "negative_document_ids": [f"d{d}" for d in neg]}) + "\n")
            passage = lambda d: {"docid": f"d{d}", "title": "", "text": texts[d]}  # noqa: E731
            g.write(json.dumps({"query_id": f"q{q}", "query": query, "positive_passages": [passage(d) for d in pos],
                                "negative_passages": [passage(d) for d in neg]}) + "\n")
    return {f"{n}_mb": round((root / n).stat().st_size / 2**20, 1) for n in ("corpus.jsonl", "by_id.jsonl", "inline.jsonl")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--negatives", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = build(Path(tmp), a.docs, a.rows, a.negatives)
        got = run_alternating(ONE, ["inline", "by-id-jsonl", "by-id-tsv"], lambda v: [tmp, v], a.repeats)
    save("prepare_by_id", {"docs": a.docs, "rows": a.rows, "negatives": a.negatives, **sizes,
                           **summarise(got, ("peak_rss_mb", "base_rss_mb", "seconds"))})


if __name__ == "__main__":
    main()
