"""`make score` with a reranker teacher: transformers vs vLLM (``backend=vllm``) vs sentence-transformers' CrossEncoder.

    .venv/bin/python bench/bench_score.py [--model outputs/models/smollm2-135m-instruct] [--per-query 16]

The teacher: SmolLM2-135M-Instruct exported as a reranker (``export_reranker``: the folder sentence-transformers
loads as a ``CrossEncoder`` scoring like ours). The records: each TREC-DL-2019 query of ../shared/data with up to
``--per-query`` of its judged passages (the first as the positive), default instruction. Each tool scores every
(query, passage) pair in fp32 with batch 16 (vLLM batches itself), in its own subprocess, alternating, 2 rounds,
medians. Reported: load seconds, scoring seconds, pairs/s, and the largest difference of each tool's relevance logits
from ours (the CrossEncoder's P(yes) taken back to its logit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "bench" / "score"
TREC = REPO.parent / "shared" / "data" / "trec-dl-2019-subset"
IMPLS = ("transformers", "vllm", "st-crossencoder")


def prepare(model: Path, per_query: int) -> tuple[Path, Path]:
    from qwen3train.models.build import ModelConfig, build_reranker
    from qwen3train.models.export import export_reranker

    OUT.mkdir(parents=True, exist_ok=True)
    queries = {q["_id"]: q["text"] for q in map(json.loads, (TREC / "queries.jsonl").read_text().splitlines())}
    docs = {d["_id"]: (f"{d['title']} {d['text']}" if d.get("title") else d["text"])
            for d in map(json.loads, filter(None, (TREC / "corpus.jsonl").read_text().split("\n")))}
    judged: dict[str, list[tuple[int, str]]] = {}
    for line in (TREC / "qrels" / "test.tsv").read_text().splitlines():
        if line.startswith("query"):  # a header
            continue
        qid, did, grade = line.split("\t")[:3]
        if qid in queries and did in docs:
            judged.setdefault(qid, []).append((-int(grade), did))
    records = OUT / "records.jsonl"
    with open(records, "w") as f:
        for qid, ds in sorted(judged.items()):
            ds = [docs[d] for _, d in sorted(ds)[:per_query]]
            if len(ds) > 1:
                f.write(json.dumps({"query": queries[qid], "pos": ds[:1], "neg": ds[1:]}) + "\n")
    teacher = OUT / "reranker"
    if not (teacher / "modules.json").exists():
        rr = build_reranker(ModelConfig(name_or_path=str(model), padding_side="left"), max_length=512)
        export_reranker(rr, teacher)
    return records, teacher


def worker(impl: str, records: str, teacher: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from qwen3train.data.records import parse_record

    recs = [parse_record(json.loads(x), records) for x in Path(records).read_text().splitlines()]
    t0 = time.perf_counter()
    if impl == "st-crossencoder":
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(teacher, device="cpu", max_length=512)
        t1 = time.perf_counter()
        pairs = [(r.query, t) for r in recs for t in r.pos + r.neg]
        probs = model.predict(pairs, batch_size=16, show_progress_bar=False)
        scores = [math.log(p / (1 - p)) for p in map(float, probs)]
    else:
        from qwen3train.mining.teacher import ScoreConfig, _teacher

        t = _teacher(ScoreConfig(inputs=[records], teacher=teacher, kind="reranker", backend=impl, precision="float32",
                                 max_length=512, batch_size=16))
        t1 = time.perf_counter()
        scores = torch.cat(t(recs)).tolist()
        getattr(t, "close", lambda: None)()
    t2 = time.perf_counter()
    return {"impl": impl, "load_s": t1 - t0, "score_s": t2 - t1, "pairs": len(scores), "scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "outputs" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--per-query", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    records, teacher = prepare(Path(a.model), a.per_query)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    runs: dict[str, list[dict]] = {k: [] for k in IMPLS}
    for _ in range(a.repeats):
        for impl in IMPLS:
            p = subprocess.run([sys.executable, __file__, "--worker", impl, str(records), str(teacher)], env=env,
                               capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                raise SystemExit(f"{impl}: exit {p.returncode}\n{p.stderr[-3000:]}")
            runs[impl].append(json.loads(p.stdout.strip().splitlines()[-1]))
    ref = runs["transformers"][0]["scores"]
    summary = {"records": len(records.read_text().splitlines()), "pairs": len(ref)}
    for impl, rs in runs.items():
        score_s = statistics.median(r["score_s"] for r in rs)
        summary[impl] = {"load_s": round(statistics.median(r["load_s"] for r in rs), 2), "score_s": round(score_s, 2),
                         "pairs_per_s": round(len(ref) / score_s, 1),
                         "max_abs_logit_diff_vs_transformers": max(abs(x - y) for x, y in zip(rs[0]["scores"], ref))}
    summary["ratios"] = {f"pairs/s {b} / {a}": round(summary[b]["pairs_per_s"] / summary[a]["pairs_per_s"], 2)
                         for a, b in (("transformers", "vllm"), ("st-crossencoder", "transformers"),
                                      ("st-crossencoder", "vllm"))}
    (OUT / "bench_score.json").write_text(json.dumps({"summary": summary, "runs": runs}))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:5])))
    else:
        main()
