"""Retrieval on a held-out pair file: each query against the pool of all positives of the file."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from qwen3train.eval.metrics import evaluate_run
from qwen3train.text import DEFAULT_INSTRUCTION


def search(q: torch.Tensor, d: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by dot product, in query chunks (never the full score matrix at once)."""
    k = min(k, d.shape[0])
    vals, idx = [], []
    for s in range(0, q.shape[0], chunk):
        v, i = (q[s:s + chunk] @ d.T).topk(k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def evaluate_pairs(model_dir: str | Path, pairs_file: str | Path, batch_size: int = 64) -> dict[str, float]:
    from qwen3train.models.build import ModelConfig, build_embedder

    rows = [json.loads(x) for x in Path(pairs_file).read_text(encoding="utf-8").split("\n") if x.strip()]
    docs = sorted({p for r in rows for p in r["pos"]})
    doc_id = {d: str(i) for i, d in enumerate(docs)}
    emb = build_embedder(ModelConfig(name_or_path=str(model_dir), max_query_length=128, max_doc_length=256))
    by_instr: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_instr[r.get("instruction") or DEFAULT_INSTRUCTION].append(i)
    qv = torch.empty((len(rows), emb.hidden_size))
    for instr, ids in by_instr.items():
        qv[ids] = emb.encode([rows[i]["query"] for i in ids], instruction=instr, batch_size=batch_size)
    dv = emb.encode(docs, batch_size=batch_size)
    vals, idx = search(qv, dv, 100)
    run = {str(i): [(str(j), float(s)) for s, j in zip(vals[i].tolist(), idx[i].tolist())] for i in range(len(rows))}
    qrels = {str(i): {doc_id[p]: 1 for p in r["pos"]} for i, r in enumerate(rows)}
    return evaluate_run(run, qrels)

