"""`make prepare`'s import of a large BEIR collection for training: peak memory holding the whole corpus as
text (before) vs only the documents the split judges (now), on a synthetic collection shaped like BEIR msmarco's
train split in miniature (each query judges 1 document; 5% of the corpus judged), fresh processes, alternating.
A third variant reads the same collection written as MS MARCO distributes it (collection.tsv, queries.train.tsv,
qrels.train.tsv in TREC's four columns).

    .venv/bin/python bench/bench_prepare_memory.py [--docs 1000000] [--repeats 2]

Checks that both give the same rows. Results: ``outputs/bench/prepare_memory.json``.
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
import qwen3train.data.prepare as p
if sys.argv[2] == "whole-corpus":
    real = p.load_collection
    p.load_collection = lambda path, split, judged_only=False: real(path, split)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter and the imports
t = time.perf_counter()
rows, stats = p.import_collection(sys.argv[1] + ("-tsv" if sys.argv[2] == "msmarco-tsv" else ""), "msmarco", None, 1,
                                  split="train")
secs = time.perf_counter() - t
digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base,
                  "seconds": secs,
                  "rows": len(rows), "digest": digest}))
"""


def build(root: Path, docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    (root / "qrels").mkdir(parents=True)
    tsv = root.with_name(root.name + "-tsv")
    tsv.mkdir()
    with open(root / "corpus.jsonl", "w") as f, open(tsv / "collection.tsv", "w") as g:
        for i in range(docs):
            text = " ".join(rng.choices(words, k=55))
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
            g.write(f"d{i}\t{text}\n")
    judged = rng.sample(range(docs), docs // 20)
    with open(root / "queries.jsonl", "w") as f, open(tsv / "queries.train.tsv", "w") as g:
        for q in range(len(judged)):
            text = " ".join(rng.choices(words, k=8))
            f.write(json.dumps({"_id": f"q{q}", "text": text}) + "\n")
            g.write(f"q{q}\t{text}\n")
    with open(root / "qrels" / "train.tsv", "w") as f, open(tsv / "qrels.train.tsv", "w") as g:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{q}\td{d}\t1\n" for q, d in enumerate(judged)))
        g.write("".join(f"q{q}\t0\td{d}\t1\n" for q, d in enumerate(judged)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "msmarco-like"
        build(root, a.docs)
        size_mb = (root / "corpus.jsonl").stat().st_size / 2**20
        got = run_alternating(ONE, ["whole-corpus", "judged-only", "msmarco-tsv"], lambda v: [str(root), v], a.repeats)
    save("prepare_memory", {"docs": a.docs, "corpus_mb": round(size_mb, 1),
                            **summarise(got, ("peak_rss_mb", "base_rss_mb", "seconds"))})


if __name__ == "__main__":
    main()
