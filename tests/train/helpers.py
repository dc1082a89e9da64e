"""Small builders shared by the training tests (real components, tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path


def make_pairs(path: Path, n: int = 48, k: int = 2, tasks=("alpha",)) -> Path:
    words = ["gravity", "python", "rope", "matrix", "tensor", "ocean", "violin", "galaxy", "protein", "compiler",
             "glacier", "sonnet", "neuron", "market", "vaccine", "kernel"]
    with open(path, "w") as f:
        for i in range(n):
            w, v = words[i % len(words)], words[(i * 7 + 3) % len(words)]
            row = {"query": f"what is {w} number {i}?", "pos": [f"{w} {i} is described here with {v}."],
                   "neg": [f"unrelated text {i}-{j} about {words[(i + j + 1) % len(words)]}" for j in range(k)],
                   "task": tasks[i % len(tasks)]}
            f.write(json.dumps(row) + "\n")
    return path


def with_teacher(path: Path) -> Path:
    """A teacher's scores on every record but each fifth (those train without the distillation term): one per
    positive and per negative, spread so that the teacher's order is not the student's (random at the start). In
    the first 8 rows only row 4 has none: split over 2 ranks, one rank holds it, the other none."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 5 != 4:
            r["pos_scores"] = [4.0 - 0.5 * j for j in range(len(r["pos"]))]
            r["neg_scores"] = [((i * 7 + j * 3) % 5) - 2.0 for j in range(len(r.get("neg", [])))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def related_rows(path: Path) -> Path:
    """Each even record of ``path`` also gets the next record's positive as a positive of its own, and the first
    negative of the record after that as ``not_neg``: pool documents the loss must mask for it
    (``loss.mask_not_neg``), from the same and, in a batch split over processes, another rank's rows."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for i in range(0, len(rows) - 2, 2):
        rows[i]["pos"].append(rows[i + 1]["pos"][0])
        rows[i]["not_neg"] = [rows[i + 2]["neg"][0]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cfg(model_dir, data_file, out_dir, **over):
    """A TrainConfig for the tiny model (typed objects, as the CLI would produce)."""
    from qwen3train.train.config import RunConfig, TrainConfig
    from qwen3train.data.sources import DataConfig
    from qwen3train.losses.infonce import InfoNCEConfig
    from qwen3train.models.build import ModelConfig
    from qwen3train.train.engine import EngineConfig
    from qwen3train.train.schedule import OptimConfig

    cfg = TrainConfig(
        run=RunConfig(name="t", output_dir=str(out_dir), max_steps=over.pop("max_steps", 4),
                      save_every=over.pop("save_every", 0), keep_last=over.pop("keep_last", 2)),
        model=ModelConfig(name_or_path=str(model_dir), max_query_length=32, max_doc_length=32),
        data=DataConfig(train_files=[str(data_file)], num_hard_negatives=over.pop("k", 2)),
        loss=InfoNCEConfig(temperature=over.pop("temperature", 0.05), kd_weight=over.pop("kd_weight", 0.0),
                           hardness_strength=over.pop("hardness", 0.0)),
        engine=EngineConfig(micro_batch_size=over.pop("micro", 4), global_batch_size=over.pop("global_batch", 8),
                            grad_cache=over.pop("grad_cache", False),
                            micro_batch_tokens=over.pop("micro_batch_tokens", None)),
        optim=OptimConfig(lr=over.pop("lr", 1e-3), warmup_steps=1),
    )
    assert not over, f"unknown overrides {over}"
    return cfg


def rerank_cfg(model_dir, data_file, out_dir, objective="sft", **over):
    """A TrainConfig for the reranker track on the tiny model (groups of 1 positive + 3 negatives)."""
    from qwen3train.losses.rerank import RerankLossConfig

    over.setdefault("global_batch", 4)
    over.setdefault("micro", 2)
    kd = over.pop("kd_weight", 0.0)
    cfg = train_cfg(model_dir, data_file, out_dir, k=3, **over)
    cfg.loss = RerankLossConfig(objective=objective, kd_weight=kd)
    cfg.model.max_doc_length = 160
    return cfg
