"""A teacher's scores on training records, for distillation (``make score``; ``loss.kd_weight``).

Not in the paper. Each record's query is scored against each of its positives and negatives by a teacher:
a reranker (``kind: reranker``, a Qwen3-Reranker-style yes/no model: our reranker exports or the released
ones) gives its relevance logit ``z_yes - z_no``; an embedder (``kind: embedder``) gives the cosine, each
text formatted as training formats it. The records are written again with ``pos_scores`` and ``neg_scores``
(FlagEmbedding's fields, one score per text, in order), which stage 1 or 2 then distils with
``loss.kd_weight > 0`` (``loss.kd_temperature``: 1 for a reranker's logits, about the student's temperature
for an embedder's cosines). Records are scored ``block`` at a time; under ``torchrun`` (``make score
NGPU=n``) the processes take the blocks in turn and rank 0 joins them in input order. Each block is kept as it
is done, so a job killed midway (a preempted node, hours into a large file) and run again scores only the
blocks it had not finished, with as many processes or not.

``backend: vllm`` serves a reranker teacher by vLLM instead: the same logits of the same token ids
(``RerankPrompt``), the engine batching a whole block and running each query's prompt once for all its documents
(prefix caching). ``tensor_parallel_size`` spreads one engine over GPUs; under ``make score NGPU=n`` n engines run
side by side, one per process on its own GPUs (``_own_gpus``), taking the blocks in turn like the ranks above.

Outputs: ``output`` and ``<stem>_summary.json``: the counts, the mean scores, and how many records the teacher
ranks a negative of above a positive (``negatives_over_a_positive``: false negatives, or a positive the
teacher doubts; ``mine.rerank_max_prob`` drops such negatives when mining). Bad records are skipped, counted
and kept in ``<stem>_rejects.jsonl``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen3train import dist, stall
from qwen3train.data.instructions import Instructions
from qwen3train.data.sources import IndexedSource, expand_files
from qwen3train.eval.encoder import encode_grouped
from qwen3train.mining.store import join_parts
from qwen3train.stall import StallReport

KINDS = ("reranker", "embedder")
BACKENDS = ("transformers", "vllm")
# pairs tokenized and scored at a time: a block of records with many mined negatives each (4,096 x 200) would
# otherwise hold every pair's token ids at once (~36 bytes a token as Python lists: GBs)
PAIRS_PER_CALL = 16384


@dataclass
class ScoreConfig:
    inputs: list[str]
    teacher: str = "outputs/rerank/final"
    kind: str = "reranker"  # reranker (relevance logit) | embedder (cosine)
    output: str = "outputs/score/scored.jsonl"
    max_length: int = 512
    batch_size: int = 16
    precision: str = "auto"  # auto | float32 | bfloat16 | float16
    block: int = 4096  # records scored and written at a time
    # transformers | vllm: a reranker teacher served by vLLM's pooling runner (the same logits from the same token
    # ids; prefix caching runs each query's prompt once for all its documents; NGPU=n: n engines side by side)
    backend: str = "transformers"
    tensor_parallel_size: int = 1  # vllm: GPUs one engine is spread over (an 8B reranker on small GPUs)
    gpu_memory_utilization: float = 0.9  # vllm: the share of each GPU's memory the engine takes
    # the instructions training uses (data.instructions.Instructions); None: the teacher kind's default
    task_instructions: dict[str, str] = field(default_factory=dict)
    default_instruction: str | None = None
    symmetric_tasks: list[str] = field(default_factory=list)
    stall_report_s: float = 900.0  # no record scored this long: each rank prints its phase and stacks; 0: off

    def __post_init__(self) -> None:
        from qwen3train.errors import at_least
        from qwen3train.precision import precision_name

        precision_name(self.precision, "score.precision")
        if self.kind not in KINDS:
            raise ValueError(f"score.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"score.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm" and self.kind != "reranker":
            raise ValueError("score.backend=vllm serves a reranker teacher; an embedder teacher (kind=embedder) "
                             "encodes each text once and runs with backend=transformers")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"score.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        at_least("score", batch_size=(self.batch_size, 1), block=(self.block, 1), max_length=(self.max_length, 8),
                 tensor_parallel_size=(self.tensor_parallel_size, 1))
        if self.stall_report_s < 0:
            raise ValueError("score.stall_report_s must be >= 0 (0: no report)")


class RerankerTeacher:
    """A yes/no reranker's relevance logits, through transformers (``Reranker.relevance``)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        from qwen3train.eval.rerank import load_reranker

        self.model = load_reranker(cfg.teacher, cfg.precision, cfg.max_length)
        self.instructions = self._instructions(cfg)
        self.batch_size = cfg.batch_size

    @staticmethod
    def _instructions(cfg: ScoreConfig) -> Instructions:
        from qwen3train.models.reranker import DEFAULT_RERANK_INSTRUCTION

        return Instructions(cfg.task_instructions, cfg.default_instruction or DEFAULT_RERANK_INSTRUCTION,
                            cfg.symmetric_tasks)

    def __call__(self, records) -> list[torch.Tensor]:
        """Per record, its scores of ``pos + neg``, in order."""
        queries, docs, instr, sizes = [], [], [], []
        for r in records:
            texts = r.pos + r.neg
            queries += [r.query] * len(texts)
            docs += texts
            instr += [self.instructions.of(r)] * len(texts)
            sizes.append(len(texts))
        n = PAIRS_PER_CALL
        scores = [self.relevance(queries[i:i + n], docs[i:i + n], instr[i:i + n]) for i in range(0, len(docs), n)]
        return list(torch.split(torch.cat(scores) if scores else torch.empty(0), sizes))

    def relevance(self, queries, docs, instructions) -> torch.Tensor:
        return self.model.relevance(queries, docs, instructions, self.batch_size)


class VLLMRerankerTeacher(RerankerTeacher):
    """The same logits served by vLLM (``backend: vllm``) from the same token ids (``RerankPrompt``): the engine
    batches the whole block itself and runs each query's prompt once for all its documents (prefix caching)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        from qwen3train.eval.encoder import resolve_precision
        from qwen3train.models.build import load_tokenizer
        from qwen3train.models.reranker import RerankPrompt
        from qwen3train.synth.vllm_backend import VLLMRelevance

        if dist.is_dist():  # in-process, vLLM takes an existing group for its world: a rank without blocks
            raise RuntimeError("bug: a vLLM engine was to start inside the job's process group")  # would hang it
        self.prompt = RerankPrompt(load_tokenizer(cfg.teacher), cfg.max_length)
        no, yes = self.prompt.tokenizer.convert_ids_to_tokens([self.prompt.no_id, self.prompt.yes_id])
        self.engine = VLLMRelevance(cfg.teacher, yes_token=yes, no_token=no, max_model_len=cfg.max_length,
                                    dtype=resolve_precision(cfg.precision, "score.precision"),
                                    tensor_parallel_size=cfg.tensor_parallel_size,
                                    gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.instructions = self._instructions(cfg)

    def relevance(self, queries, docs, instructions) -> torch.Tensor:
        return self.engine(self.prompt.token_ids(queries, docs, instructions))

    def close(self) -> None:
        self.engine.close()


class EmbedderTeacher:
    def __init__(self, cfg: ScoreConfig) -> None:
        from qwen3train.eval.encoder import Encoder
        from qwen3train.text import DEFAULT_INSTRUCTION

        self.encoder = Encoder(cfg.teacher, max_length=cfg.max_length, batch_size=cfg.batch_size,
                               precision=cfg.precision)
        self.instructions = Instructions(cfg.task_instructions, cfg.default_instruction or DEFAULT_INSTRUCTION,
                                         cfg.symmetric_tasks)

    def __call__(self, records) -> list[torch.Tensor]:
        q = encode_grouped(self.encoder.encode_queries, [(self.instructions.of(r), r.query) for r in records])
        docs = [(self.instructions.document(r.task, r.type, r.instruction), t) for r in records for t in r.pos + r.neg]
        d = encode_grouped(self.encoder.encode_docs, docs)
        sizes = [len(r.pos) + len(r.neg) for r in records]
        rows = torch.repeat_interleave(torch.arange(len(records)), torch.tensor(sizes, dtype=torch.long))
        return list(torch.split((q[rows] * d).sum(dim=1), sizes))


def _teacher(cfg: ScoreConfig):
    if cfg.kind == "embedder":
        return EmbedderTeacher(cfg)
    return VLLMRerankerTeacher(cfg) if cfg.backend == "vllm" else RerankerTeacher(cfg)


def run_score(cfg: ScoreConfig) -> dict:
    side_by_side = cfg.backend == "vllm" and dist.world_size() > 1
    if side_by_side:
        _own_gpus(cfg.tensor_parallel_size)
    dist.init()
    with StallReport(cfg.stall_report_s, dist.rank(), "score.stall_report_s", "no record scored"):
        return _score(cfg, grouped=not side_by_side)


def _own_gpus(tensor_parallel_size: int) -> None:
    """``make score NGPU=n backend=vllm``: n vLLM engines side by side, one per process, each seeing only its own
    GPUs (the local rank's ``tensor_parallel_size`` of those visible), set before anything touches CUDA. The
    processes build the record index together, then leave their group before the engines start (an engine
    started inside it would take it for its own) and meet again through the block files (``_score``)."""
    import os

    from qwen3train.errors import ConfigError

    lr, tp = dist.local_rank(), tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range((lr + 1) * tp)]
    mine = ids[lr * tp:(lr + 1) * tp]
    if len(mine) < tp:
        raise ConfigError(f"make score with {dist.world_size()} processes of score.tensor_parallel_size={tp} needs "
                          f"{tp} GPUs for local rank {lr}; CUDA_VISIBLE_DEVICES={visible} leaves {len(mine)}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def _wait_for_blocks(blocks: list[Path]) -> None:
    """Rank 0 of engines side by side: until every block is written (each new one re-arms the stall report; a
    rank that failed ends the job through torchrun). One look a second at the first block not yet seen, not a
    look at every block: a large file has tens of thousands, on a shared file system."""
    import time

    at = 0
    while at < len(blocks):
        if blocks[at].exists():
            at += 1
            stall.beat()
        else:
            time.sleep(1.0)


def _parts_dir(cfg: ScoreConfig, out: Path, source: IndexedSource) -> Path:
    """Where the blocks of this job are kept until joined: named by what decides their scores (the records as
    indexed, the teacher's files, the settings), so a rerun of the same job reuses them and another never does."""
    import hashlib

    from qwen3train.stage_marker import path_fingerprint

    teacher = Path(cfg.teacher)
    settings = {"data": source.fingerprint(), "teacher": cfg.teacher, "kind": cfg.kind,
                "files": path_fingerprint(teacher) if teacher.exists() else "hub", "max_length": cfg.max_length,
                "precision": cfg.precision, "block": cfg.block,
                "instructions": [cfg.task_instructions, cfg.default_instruction, cfg.symmetric_tasks]}
    if cfg.backend != "transformers":  # (keyed only when not the default: the blocks of a job begun before it kept)
        settings["backend"] = cfg.backend
    key = json.dumps(settings, sort_keys=True, default=str)
    return out.with_name(f".{out.name}.parts-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def _score_block(teacher, records, path: Path) -> None:
    """One block's scored records (``block-N.jsonl``) and its figures (``block-N.json``), each written whole
    under a temporary name and renamed: the JSONL's presence says the block is done."""
    stats = np.zeros(6)  # records, positives, negatives, sum of positive scores, sum of negative scores, over
    lines = []
    for r, s in zip(records, teacher(records)):
        s = s.tolist()
        pos, neg = s[:len(r.pos)], s[len(r.pos):]
        row = {"query": r.query, "pos": r.pos, "neg": r.neg, "task": r.task, "instruction": r.instruction}
        row |= r.carried() | {"pos_scores": [round(x, 6) for x in pos], "neg_scores": [round(x, 6) for x in neg]}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        stats += (1, len(pos), len(neg), sum(pos), sum(neg), bool(neg) and max(neg) > min(pos))
    for target, text in ((path.with_suffix(".json"), json.dumps(stats.tolist())), (path, "".join(lines))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)


def _score(cfg: ScoreConfig, grouped: bool = True) -> dict:
    """Blocks of ``cfg.block`` records, taken by the ranks in turn; each kept as it is done, so a job killed
    midway and run again (with as many processes or not) scores only the blocks it had not finished."""
    from qwen3train.progress import Progress

    stall.enter("the reading of the inputs")
    rank, world = dist.rank(), dist.world_size()
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix else out
    source = IndexedSource(expand_files(cfg.inputs), on_error="skip",
                           rejects_path=Path(f"{stem}_rejects.jsonl") if rank == 0 else None)
    n = len(source)
    parts = _parts_dir(cfg, out, source)
    blocks = [parts / f"block-{b:07d}.jsonl" for b in range(-(-n // cfg.block))]
    kept = sum(f.exists() for f in blocks)
    todo = [b for b in range(rank, len(blocks), world) if not blocks[b].exists()]
    if rank == 0 and kept:
        print(f"score: {kept} blocks of {len(blocks)} kept from an earlier run of this job ({parts}): not scored "
              f"again", flush=True)
    if not grouped:  # engines side by side: the index is built, the group is left (see _own_gpus)
        dist.cleanup()
    if todo:
        stall.enter("the loading of the teacher")
        parts.mkdir(exist_ok=True)
        teacher = _teacher(cfg)
        bar = Progress(sum(min(cfg.block, n - b * cfg.block) for b in todo),
                       "score (this rank's records)" if world > 1 else "score", "records")
        try:
            for b in todo:
                ids = list(range(b * cfg.block, min((b + 1) * cfg.block, n)))
                stall.enter(f"the scoring of records {ids[0] + 1}-{ids[-1] + 1} of {n}")
                _score_block(teacher, source.records(ids), blocks[b])
                bar.update(len(ids))
        finally:
            getattr(teacher, "close", lambda: None)()
        bar.close()
    stall.enter("the wait for the other ranks' records")
    if grouped:
        dist.barrier()
    elif rank == 0:
        _wait_for_blocks(blocks)
    summary = {}
    if rank == 0:
        total = np.sum([json.loads(f.with_suffix(".json").read_text()) for f in blocks] or [np.zeros(6)], axis=0)
        recs, npos, nneg, spos, sneg, over = total.tolist()
        join_parts(blocks, out)
        for f in blocks:
            f.with_suffix(".json").unlink()
        shutil.rmtree(parts, ignore_errors=True)
        summary = {"teacher": cfg.teacher, "kind": cfg.kind, "backend": cfg.backend, "output": str(out),
                   "processes": world, "records": int(recs), "skipped_bad_records": sum(source.rejected.values()),
                   "mean_positive_score": spos / max(npos, 1), "mean_negative_score": sneg / max(nneg, 1),
                   "negatives_over_a_positive": int(over)}
        Path(f"{stem}_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"score: {int(recs)} records scored by {cfg.kind} {cfg.teacher} -> {out} (mean score: positives "
              f"{summary['mean_positive_score']:.3f}, negatives {summary['mean_negative_score']:.3f}; "
              f"{int(over)} records with a negative scored above a positive)", flush=True)
    if grouped:
        summary = dist.broadcast_object(summary)
        dist.cleanup()
    return summary
