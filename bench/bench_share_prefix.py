"""Shared prefixes in packed rows (``model.share_prefix``) vs the same packed rows without them, for the
reranker, side by side on the CPU.

    .venv/bin/python bench/bench_share_prefix.py [--repeats 3] [--queries 24] [--max-length 128]

Model: SmolLM2-135M-Instruct (``make smollm2``), the shapes of ``make pipeline``'s reranker: max length 128,
bf16 autocast where the CPU computes bf16 (fp32 masters).
  train : a listwise training step's forward + backward, 8 queries x (1 positive + 3 negatives);
  score : evaluation, each query's top 10 scored in one call (``Reranker.score``).
Data: the real recipe's training pairs (``make real-data``): queries, their positives, and other queries'
positives as the negatives / candidates. Each variant runs in its own process (2 threads), variants
alternate within each repeat, and the median is kept. The scores of the two variants are compared too
(maximum difference of the yes/no logit). Ratios matter, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "outputs" / "models" / "smollm2-135m-instruct"
DATA = REPO / "outputs" / "data" / "real" / "train.jsonl"


def _pairs(n_queries: int, docs_per_query: int):
    rows = [json.loads(line) for line in DATA.open()][: n_queries + docs_per_query]
    docs = [r["pos"][0] for r in rows]
    out = []
    for k, r in enumerate(rows[:n_queries]):
        cands = [docs[k]] + [docs[(k + 1 + j) % len(docs)] for j in range(docs_per_query - 1)]
        out.append((r["query"], r.get("instruction"), cands))
    return out


def worker(share: int, repeats: int, n_queries: int, max_length: int) -> dict:
    import torch

    from qwen3train.models.build import ModelConfig, build_reranker
    from qwen3train.precision import native_bf16

    torch.set_num_threads(2)
    precision = "bf16" if native_bf16("cpu") else "fp32"

    def autocast_context(precision, device):
        return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    rr = build_reranker(ModelConfig(name_or_path=str(MODEL), share_prefix=share), max_length=max_length,
                        train_precision=precision)
    out = {"precision": precision}
    # training: 8 queries x 4 documents per step
    groups = _pairs(n_queries, 4)
    steps = [groups[i:i + 8] for i in range(0, len(groups) - 7, 8)]
    times, computed, real = [], 0, 0
    for _ in range(repeats):
        for step in steps:
            ids = rr.token_ids([q for q, _, c in step for _ in c], [d for _, _, c in step for d in c],
                               [i for _, i, c in step for _ in c])
            packed = rr.pack(ids)
            computed += sum(r.input_ids.shape[1] for r in packed.rows)
            real += packed.num_tokens
            t = time.perf_counter()
            with autocast_context(precision, "cpu"):
                z = rr(**packed.inputs("cpu"))
            (z[:, 1] - z[:, 0]).sum().backward()
            times.append(time.perf_counter() - t)
    rr.zero_grad(set_to_none=True)
    out["train_step_s"] = statistics.median(times)
    out["train_tokens_computed_per_real"] = computed / real
    # scoring: top 10 per query
    cands = _pairs(n_queries, 10)
    t = time.perf_counter()
    with autocast_context(precision, "cpu"):
        scores = [rr.score(q, c, instruction=i).tolist() for q, i, c in cands]
    out["score_queries_per_s"] = len(cands) / (time.perf_counter() - t)
    out["scores"] = scores
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--worker", type=int, default=None)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, 1, args.queries, args.max_length)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    runs = {"unshared": [], "shared": []}
    for _ in range(args.repeats):
        for name, share in (("unshared", 0), ("shared", 16)):
            proc = subprocess.run([sys.executable, __file__, "--worker", str(share), "--queries", str(args.queries),
                                   "--max-length", str(args.max_length)], env=env, capture_output=True, text=True,
                                  cwd=REPO, check=True)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"train_step_s": statistics.median(r["train_step_s"] for r in rs),
                         "score_queries_per_s": statistics.median(r["score_queries_per_s"] for r in rs),
                         "train_tokens_computed_per_real": rs[0]["train_tokens_computed_per_real"]}
    a, b = runs["unshared"][0]["scores"], runs["shared"][0]["scores"]
    summary["max_score_difference"] = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    summary["train_speedup"] = summary["unshared"]["train_step_s"] / summary["shared"]["train_step_s"]
    summary["score_speedup"] = summary["shared"]["score_queries_per_s"] / summary["unshared"]["score_queries_per_s"]
    summary["precision"] = runs["shared"][0]["precision"]
    out = REPO / "outputs" / "bench" / "bench_share_prefix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
