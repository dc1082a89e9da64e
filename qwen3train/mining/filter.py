"""Cosine filter (paper §3.3): keep synthetic pairs whose query-positive cosine exceeds a threshold.

The paper keeps pairs with cosine > 0.7 from randomly sampled synthetic data; which embedder scored
them is UNCONFIRMED (spec §4.1): the default here is the stage-1 export. Outputs in ``output_dir``:
``kept.jsonl`` (pairs above the threshold, with their ``score``), ``dropped.jsonl`` (the rest, kept
for inspection), ``summary.json`` and ``histogram.png`` (the score distribution, threshold marked).
Pairs are scored and written ``block`` at a time, so memory is one block of embeddings whatever the
input size; under ``torchrun`` (``make filter NGPU=n``) each process scores a contiguous share and
rank 0 joins the outputs in input order. ``precision: auto`` scores in bf16 where the hardware has native bf16: cosines move by
~1e-4, which can flip only pairs that close to the threshold; ``float32`` for exact decisions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen3train import dist, stall
from qwen3train.data.instructions import Instructions
from qwen3train.data.sources import IndexedSource, expand_files
from qwen3train.eval.encoder import Encoder, encode_grouped
from qwen3train.mining.store import join_parts
from qwen3train.stall import StallReport
from qwen3train.text import DEFAULT_INSTRUCTION


@dataclass
class FilterConfig:
    inputs: list[str]
    embedder: str = "outputs/stage1/final"
    threshold: float = 0.7
    output_dir: str = "outputs/filter"
    max_length: int = 512
    batch_size: int = 64
    sample: int = 0  # score a seeded random sample of this many pairs (0: all), as the paper did
    seed: int = 0
    precision: str = "auto"  # auto | float32 | bfloat16 | float16
    block: int = 16384  # pairs scored and written at a time
    # the instructions training uses (data.instructions.Instructions; the pipeline passes stage 2's)
    task_instructions: dict[str, str] = field(default_factory=dict)
    default_instruction: str = DEFAULT_INSTRUCTION
    symmetric_tasks: list[str] = field(default_factory=list)
    # no pair scored for this long: each rank prints its phase and threads' stacks (qwen3train/stall.py); 0: off
    stall_report_s: float = 900.0

    def __post_init__(self) -> None:
        from qwen3train.precision import precision_name

        precision_name(self.precision, "filter.precision")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"filter.threshold is a cosine, between -1 and 1; got {self.threshold}")
        if self.stall_report_s < 0:
            raise ValueError("filter.stall_report_s must be >= 0 (0: no report)")
        from qwen3train.errors import at_least

        at_least("filter", batch_size=(self.batch_size, 1))


def score_pairs(encoder: Encoder, records, instructions: Instructions | None = None) -> torch.Tensor:
    """Cosine of each record's query and first positive, each formatted as training formats them."""
    instructions = instructions or Instructions()
    q = encode_grouped(encoder.encode_queries, [(instructions.of(r), r.query) for r in records])
    # symmetric tasks: documents get the instruction too
    d = encode_grouped(encoder.encode_docs, [(instructions.document(r.task, r.type, r.instruction), r.pos[0])
                                             for r in records])
    return (q * d).sum(dim=1)


def run_filter(cfg: FilterConfig) -> dict:
    dist.init()
    with StallReport(cfg.stall_report_s, dist.rank(), "filter.stall_report_s", "no pair scored"):
        return _filter(cfg)


def _filter(cfg: FilterConfig) -> dict:
    import numpy as np

    stall.enter("the reading of the inputs")
    rank, world = dist.rank(), dist.world_size()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = IndexedSource(expand_files(cfg.inputs), on_error="skip",
                           rejects_path=out / "rejects.jsonl" if rank == 0 else None)
    idx = list(range(len(source)))
    if cfg.sample and cfg.sample < len(idx):
        idx = sorted(np.random.default_rng(cfg.seed).choice(len(idx), cfg.sample, replace=False).tolist())
    mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]
    encoder = Encoder(cfg.embedder, max_length=cfg.max_length, batch_size=cfg.batch_size, precision=cfg.precision)
    # one bar for the filter (below); the encoder's own per-call lines would repeat it for every block
    instructions = Instructions(cfg.task_instructions, cfg.default_instruction, cfg.symmetric_tasks)
    part = {name: out / f".{name}.rank{rank}.tmp" for name in ("kept", "dropped", "scores")}
    blocks = []
    from qwen3train.progress import Progress

    bar = Progress(len(mine), "filter (this rank's pairs)" if world > 1 else "filter", "pairs")
    with open(part["kept"], "w", encoding="utf-8") as fk, open(part["dropped"], "w", encoding="utf-8") as fd:
        for b in range(0, len(mine), cfg.block):
            stall.enter(f"the scoring of this rank's pairs {b + 1}-{min(len(mine), b + cfg.block)} of {len(mine)}")
            records = source.records(mine[b:b + cfg.block])  # checked against the files as indexed
            block_scores = score_pairs(encoder, records, instructions)
            blocks.append(block_scores.numpy())
            for r, s in zip(records, block_scores.tolist()):
                row = {"query": r.query, "pos": r.pos, "neg": r.neg, "task": r.task, "instruction": r.instruction,
                       "score": round(s, 6)} | r.carried()
                (fk if s > cfg.threshold else fd).write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(records))
    bar.close()
    np.concatenate(blocks or [np.empty(0, np.float32)]).astype(np.float32).tofile(part["scores"])
    stall.enter("the wait for the other ranks' pairs")
    dist.barrier()
    summary = {}
    if rank == 0:
        stall.enter("the joining of the ranks' parts")
        scores = np.concatenate([np.fromfile(out / f".scores.rank{r}.tmp", dtype=np.float32) for r in range(world)])
        for r in range(world):
            (out / f".scores.rank{r}.tmp").unlink()
        for name in ("kept", "dropped"):
            join_parts([out / f".{name}.rank{r}.tmp" for r in range(world)], out / f"{name}.jsonl")
        kept = int((scores.astype(np.float64) > cfg.threshold).sum())  # the rows' own test
        summary = {"embedder": cfg.embedder, "threshold": cfg.threshold, "precision": encoder.precision,
                   "processes": world, "scored": len(idx), "kept": kept, "dropped": len(idx) - kept,
                   "kept_fraction": kept / max(len(idx), 1), "skipped_bad_records": sum(source.rejected.values()),
                   "score_mean": float(scores.mean()) if len(idx) else float("nan"),
                   "score_quantiles": {str(q): float(np.quantile(scores, q)) for q in (0.1, 0.5, 0.9)} if len(idx) else {}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        histogram(scores, cfg.threshold, out / "histogram.png",
                  title=f"cosine filter: {Path(cfg.embedder).parent.name}/{Path(cfg.embedder).name}")
    stall.enter("the wait for rank 0's joining of the parts")
    summary = dist.broadcast_object(summary)
    dist.cleanup()
    return summary


def histogram(scores, threshold: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(scores, bins=40, color="#4c72b0", alpha=0.85)
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
    kept = float((scores > threshold).mean()) if len(scores) else 0.0
    ax.set_xlabel("cosine(query, positive)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{title} — kept {kept:.0%} of {len(scores)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
