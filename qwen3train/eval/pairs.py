"""Retrieval on a held-out pair file: each query against the pool of all positives of the file."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from qwen3train.data.instructions import NO_TASK, Instructions
from qwen3train.data.jsonl import read_jsonl
from qwen3train.eval.metrics import evaluate_run
from qwen3train.eval.search import topk


def evaluate_pairs(model_dir: str | Path, pairs_file: str | Path, batch_size: int = 64,
                   encoder=None, instructions: Instructions | None = None, per_query: bool = False) -> dict:
    """Queries get their instruction by the training rule (``data.instructions.Instructions``)."""
    from qwen3train.eval.encoder import Encoder

    rows = read_jsonl(pairs_file)
    docs = sorted({p for r in rows for p in r["pos"]})
    doc_id = {d: str(i) for i, d in enumerate(docs)}
    enc = encoder or Encoder(model_dir, max_length=256, batch_size=batch_size)
    instructions = instructions or Instructions()
    by_instr: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_instr[instructions.query(r.get("task") or NO_TASK, r.get("instruction") or r.get("prompt"))].append(i)
    parts = {instr: enc.encode_queries([rows[i]["query"] for i in ids], instr) for instr, ids in by_instr.items()}
    qv = torch.empty((len(rows), next(iter(parts.values())).shape[1]))
    for instr, ids in by_instr.items():
        qv[ids] = parts[instr]
    dv = enc.encode_docs(docs)
    vals, idx = topk(qv, dv, 100)
    run = {str(i): [(str(j), float(s)) for s, j in zip(vals[i].tolist(), idx[i].tolist())] for i in range(len(rows))}
    qrels = {str(i): {doc_id[p]: 1 for p in r["pos"]} for i, r in enumerate(rows)}
    return evaluate_run(run, qrels, per_query=per_query)

