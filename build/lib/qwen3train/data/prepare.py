"""Labelled-data import and mixing for stage 2 (``make prepare``).

Sources are BEIR folders, TREC folders, or training JSONL (FlagEmbedding-style, or our own outputs:
filtered synthetic pairs, mined files). Each source has a task name (instruction from the registry
unless given) and either a ``weight`` or a fixed ``count``; the mix is written as one JSONL whose
records keep their ``task``, so training batches stay single-task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen3train.data.collections import load_collection
from qwen3train.data.instructions import REGISTRY
from qwen3train.data.records import DataError, parse_record
from qwen3train.data.sources import expand_files


@dataclass
class SourceConfig:
    path: str
    task: str | None = None
    instruction: str | None = None
    weight: float = 1.0
    count: int = 0  # exact number of records (sampled with replacement if larger than the source)
    min_relevance: int = 1


@dataclass
class PrepareConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    output: str = "outputs/prepare/stage2.jsonl"
    total: int = 0  # with weights: total records of the mix (0: every record of every source once)
    seed: int = 0


def import_collection(path: str | Path, task: str | None, instruction: str | None, min_relevance: int):
    """BEIR/TREC -> training rows (one per query with at least one relevant document); stats."""
    col = load_collection(path)
    task = task or col.name
    instr = instruction or REGISTRY.get(task.lower())
    rows, no_pos = [], 0
    for qid, rels in col.qrels.items():
        pos = [col.corpus[d] for d, r in sorted(rels.items()) if r >= min_relevance and d in col.corpus]
        if not pos:
            no_pos += 1
            continue
        row = {"query": col.queries[qid], "pos": pos, "task": task}
        if instr:
            row["instruction"] = instr
        rows.append(row)
    return rows, {"source": str(path), "rows": len(rows), "queries_without_positive": no_pos, **col.missing}


def import_jsonl(path: str, task: str | None, instruction: str | None):
    """Validated training JSONL (our schema / FlagEmbedding's; ``prompt`` is read as the instruction).
    Bad records are counted and left out (the prepare summary reports them)."""
    rows, rejected = [], 0
    for p in expand_files([path]):
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    r = parse_record(obj, f"{p}:{lineno}")
                except (json.JSONDecodeError, DataError):
                    rejected += 1
                    continue
                row = {"query": r.query, "pos": r.pos, "task": task or r.task}
                if r.neg:
                    row["neg"] = r.neg
                ins = instruction or r.instruction or obj.get("prompt")
                if ins:
                    row["instruction"] = ins
                if r.type:
                    row["type"] = r.type
                rows.append(row)
    return rows, {"source": path, "rows": len(rows), "rejected": rejected}


def run_prepare(cfg: PrepareConfig) -> dict:
    rng = np.random.default_rng(cfg.seed)
    parts, report = [], []
    for s in cfg.sources:
        p = Path(s.path)
        if p.is_dir():
            rows, st = import_collection(p, s.task, s.instruction, s.min_relevance)
        else:
            rows, st = import_jsonl(s.path, s.task, s.instruction)
        parts.append((s, rows))
        report.append(st)
    total_w = sum(s.weight for s, _ in parts if not s.count)
    mixed = []
    for (s, rows), st in zip(parts, report):
        if not rows:
            continue
        n = s.count or (round(cfg.total * s.weight / total_w) if cfg.total else len(rows))
        pick = rng.choice(len(rows), n, replace=n > len(rows)) if n != len(rows) else np.arange(len(rows))
        mixed += [rows[i] for i in pick.tolist()]
        st["taken"] = int(n)
    order = rng.permutation(len(mixed))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in order.tolist():
            f.write(json.dumps(mixed[i], ensure_ascii=False) + "\n")
    tmp.replace(out)
    summary = {"output": str(out), "records": len(mixed), "sources": report}
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
