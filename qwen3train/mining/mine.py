"""Hard-negative mining: encode a corpus once (cached), exact top-k in chunks, sample negatives from
a rank window, guard against false negatives, optionally rescore with a reranker.

For each query: candidates = top ``range_max`` documents by cosine; drop ranks before ``range_min``,
the query's positives and its ``not_neg`` texts (by text), and any candidate scoring above
``max_score_ratio * s(q, d+)`` (NV-Retriever's relative rule) or above ``s(q, d+) - margin`` when ``margin``
is set; optionally a reranker drops candidates it judges relevant (probability > ``rerank_max_prob``). Then
``num_negatives`` are taken (``top`` or seeded ``random``). Output: the input records with ``neg`` and ``neg_scores``
(and ``pos_score``); records left with no negative are counted and written without ``neg`` to
``no_negatives.jsonl``. With ``consistency_top_k`` = k (ranking-consistency filtering, as KaLM-Embedding's
miner does; off by default, not in the Qwen3 paper), a record whose first positive is not among the embedder's
top k for its query (k or more other documents, neither its positives nor its ``not_neg`` texts, score above
it) is a likely wrong or weak pair: it is not mined but written, with ``pos_rank``, to ``inconsistent.jsonl``.

Scale: the corpus, the queries and the positives missing from the corpus are encoded to an on-disk
store (``qwen3train.mining.store``: chunked, resumable after a kill, sharded over the processes of
``torchrun``/``make mine NGPU=n``, reused by later runs). Each process then searches a contiguous
range of the queries, ``query_block`` at a time, against the memory-mapped corpus embeddings, and
rank 0 joins the per-rank outputs in input order. Resident memory is the corpus texts plus one block
of queries and one chunk of scores, not the embedding matrices. ``precision: auto`` encodes in bf16
where the hardware has native bf16 (embeddings and scores stay float32).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen3train import dist, stall
from qwen3train.errors import ConfigError
from qwen3train.data.instructions import Instructions
from qwen3train.data.sources import IndexedSource, expand_files
from qwen3train.eval.encoder import Encoder
from qwen3train.eval.search import ExactSearch, FaissSearch
from qwen3train.mining.store import encode_to_store, join_parts
from qwen3train.stall import StallReport
from qwen3train.text import DEFAULT_INSTRUCTION


@dataclass
class MineConfig:
    inputs: list[str]
    corpus: list[str] | None = None  # BEIR corpus.jsonl / JSONL with "text"; default: every positive of the inputs
    embedder: str = "outputs/stage1/final"
    output: str = "outputs/mine/mined.jsonl"
    cache_dir: str | None = "outputs/cache/embeddings"
    num_negatives: int = 7
    range_min: int = 0
    range_max: int = 50
    max_score_ratio: float | None = 0.95
    margin: float | None = None
    # k: a record whose first positive k or more other documents outscore is written to inconsistent.jsonl,
    # not mined (ranking-consistency filtering); null: off. At most range_max (the candidates seen).
    consistency_top_k: int | None = None
    sampling: str = "top"
    reranker: str | None = None
    rerank_max_prob: float = 0.5
    use_faiss: bool = False
    max_length: int = 512
    batch_size: int = 64
    precision: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 where native)
    chunk_size: int = 16384  # texts per resumable encoding chunk (the unit of sharding)
    query_block: int = 16384  # queries searched at a time (bounds the score and embedding memory)
    seed: int = 0
    # > 0: mine a seeded sample of this many records (the rest are not written): a short stage 2 needs a few
    # thousand mined records, not the whole input; the default corpus is then the sample's positives
    sample: int = 0
    dist_timeout_min: int = 720  # ranks wait for each other's encoding shards this long
    # no text encoded and no query searched for this long: each rank prints its phase and threads' stacks
    # (qwen3train/stall.py; nothing is stopped); 0: off
    stall_report_s: float = 900.0
    # the instructions training uses (data.instructions.Instructions; the pipeline passes stage 2's)
    task_instructions: dict[str, str] = field(default_factory=dict)
    default_instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self) -> None:
        from qwen3train.precision import precision_name

        precision_name(self.precision, "mine.precision")
        if self.sampling not in ("top", "random"):
            raise ValueError("mine.sampling must be top or random")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError("mine needs 0 <= range_min < range_max")
        if self.consistency_top_k is not None and not 1 <= self.consistency_top_k <= self.range_max:
            raise ValueError(f"mine.consistency_top_k must be in [1, range_max={self.range_max}] (null: off): only "
                             f"the top range_max documents are ranked; got {self.consistency_top_k}")
        if self.stall_report_s < 0:
            raise ValueError("mine.stall_report_s must be >= 0 (0: no report)")
        from qwen3train.errors import at_least

        at_least("mine", num_negatives=(self.num_negatives, 1), query_block=(self.query_block, 1),
                 chunk_size=(self.chunk_size, 1), sample=(self.sample, 0))
        if self.max_score_ratio is not None and self.max_score_ratio <= 0:
            raise ValueError(f"mine.max_score_ratio must be > 0 (null: no ratio rule), got {self.max_score_ratio}")
        if not 0.0 <= self.rerank_max_prob <= 1.0:
            raise ValueError(f"mine.rerank_max_prob is a probability, in [0, 1]; got {self.rerank_max_prob}")


def load_corpus(paths: list[str]) -> list[str]:
    """Document texts of JSONL / Parquet / text files (the stage-0 corpus reader), a title joined as BEIR and
    ``make prepare`` join it (``title text``): the positives and ``not_neg`` texts of prepared rows are found in
    the corpus by their text. With stage 0's ``Title. Text`` none of a titled collection's were (DBpedia: no
    positive recognised, only the score-ratio guard kept them out of the negatives)."""
    from qwen3train.synth.corpus import read_documents

    return [text for _, text, _ in read_documents(expand_files(paths), "English", title_sep=" ")]


def select_negatives(cands: list[tuple[int, float]], pos_texts: set[str], pos_score: float, docs: list[str],
                     cfg: MineConfig, not_neg: set[str] = frozenset()) -> tuple[list[int], dict]:
    """Apply the window and the false-negative guards to one query's ranked candidates (``not_neg``: the
    record's texts that are never negatives, e.g. documents judged relevant below prepare's threshold)."""
    dropped = defaultdict(int)
    keep = []
    for rank, (j, s) in enumerate(cands):
        if rank < cfg.range_min:
            dropped["rank_window"] += 1
        elif docs[j] in pos_texts:
            dropped["is_positive"] += 1
        elif docs[j] in not_neg:
            dropped["not_neg"] += 1
        elif cfg.max_score_ratio is not None and s > cfg.max_score_ratio * pos_score:
            dropped["above_ratio"] += 1
        elif cfg.margin is not None and s > pos_score - cfg.margin:
            dropped["within_margin"] += 1
        else:
            keep.append(rank)
    return keep, dropped


def _log(msg: str) -> None:
    if dist.is_main():
        print(f"[mine] {msg}", flush=True)


def run_mine(cfg: MineConfig) -> dict:
    dist.init(timeout_min=cfg.dist_timeout_min)
    with StallReport(cfg.stall_report_s, dist.rank(), "mine.stall_report_s", "no text encoded, no query searched"):
        return _mine(cfg)


def _mine(cfg: MineConfig) -> dict:
    stall.enter("the reading of the inputs")
    rank, world = dist.rank(), dist.world_size()
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = IndexedSource(expand_files(cfg.inputs), on_error="skip",
                           rejects_path=out.parent / "rejects.jsonl" if rank == 0 else None)
    n = len(source)
    if n == 0:
        raise ConfigError(f"mine: no valid records in {cfg.inputs} ({sum(source.rejected.values())} rejected, "
                         f"see {out.parent / 'rejects.jsonl'})")
    picked = np.arange(n)
    if 0 < cfg.sample < n:
        picked = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.sample, replace=False))
        n = len(picked)
    source = _Picked(source, picked)
    queries, first_pos, group_of, instrs = [], [], np.empty(n, dtype=np.int32), {}
    instructions = Instructions(cfg.task_instructions, cfg.default_instruction)
    for i in range(n):
        r = source[i]
        instr = instructions.of(r)
        group_of[i] = instrs.setdefault(instr, len(instrs))
        queries.append(r.query)
        first_pos.append(r.pos[0])
    if cfg.corpus:
        docs = load_corpus(cfg.corpus)
    else:
        docs = sorted({p for i in range(n) for p in source[i].pos})
    docs = list(dict.fromkeys(docs))  # identical texts once
    enc = Encoder(cfg.embedder, max_length=cfg.max_length, batch_size=cfg.batch_size, precision=cfg.precision,
                  label="mine")
    _log(f"{n} queries, {len(docs)} documents, {world} process(es), precision {enc.precision}")
    store = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / f".{out.name}.store"

    def encode(texts, **kw):
        # without a cache folder the store is removed at the end: keyed by the weight files' stat, not hashed
        return encode_to_store(enc, texts, store, chunk_size=cfg.chunk_size, log=_log,
                               by_content=bool(cfg.cache_dir), **kw)

    dvec = encode(docs)
    # queries grouped by instruction; row_of[i] = row of query i inside its group's store
    row_of = np.empty(n, dtype=np.int64)
    qstores = []
    for instr, g in instrs.items():
        ids = np.flatnonzero(group_of == g)
        row_of[ids] = np.arange(len(ids))
        qstores.append(encode([queries[i] for i in ids], instruction=instr, query=True))
    # positives already in the corpus reuse its embeddings; only the others are encoded
    where = {t: j for j, t in enumerate(docs)}
    missing = sorted({p for p in first_pos if p not in where})
    extra = encode(missing) if missing else None
    where.update({t: len(docs) + j for j, t in enumerate(missing)})
    del queries

    reranker = None
    if cfg.reranker:
        from qwen3train.models.build import ModelConfig, build_reranker

        stall.enter("the loading of the reranker")
        reranker = build_reranker(ModelConfig(name_or_path=cfg.reranker, padding_side="left"))
        if torch.cuda.is_available():
            reranker.cuda()
    # the corpus embeddings go to the GPU once (when they fit) and serve every block of queries
    searcher = FaissSearch(dvec) if cfg.use_faiss else ExactSearch(dvec)
    lo, hi = rank * n // world, (rank + 1) * n // world
    finals = {"mined": (out, out.name), "none": (out.with_name("no_negatives.jsonl"), "no_negatives"),
              "inconsistent": (out.with_name("inconsistent.jsonl"), "inconsistent")}
    stats = defaultdict(int)
    from qwen3train.progress import Progress

    bar = Progress(hi - lo, "mine: search and pick negatives", "queries")
    with ExitStack() as stack:
        parts = {kind: stack.enter_context(open(out.with_name(f".{name}.rank{rank}.tmp"), "w", encoding="utf-8"))
                 for kind, (_, name) in finals.items()}
        for b0 in range(lo, hi, cfg.query_block):
            b1 = min(hi, b0 + cfg.query_block)
            stall.enter(f"the search of queries {b0 + 1}-{b1} of {n}")
            qvec = _gather_queries(qstores, group_of[b0:b1], row_of[b0:b1])
            pidx = np.array([where[p] for p in first_pos[b0:b1]])
            pvec = np.empty_like(qvec)
            in_corpus = pidx < len(docs)
            pvec[in_corpus] = dvec[np.sort(pidx[in_corpus])][np.argsort(np.argsort(pidx[in_corpus]))]
            if extra is not None and (~in_corpus).any():
                rows = pidx[~in_corpus] - len(docs)
                pvec[~in_corpus] = extra[np.sort(rows)][np.argsort(np.argsort(rows))]
            pos_scores = (qvec * pvec).sum(1)
            scores, idx = searcher.topk(torch.from_numpy(qvec), cfg.range_max)
            recs = source.records(range(b0, b1))  # as encoded at the start: checked against the files as indexed
            for bi, i in enumerate(range(b0, b1)):
                kind, row = _mine_one(recs[bi], idx[bi].tolist(), scores[bi].tolist(), float(pos_scores[bi]), docs,
                                      cfg, reranker, stats, seed=(cfg.seed, i))
                parts[kind].write(json.dumps(row, ensure_ascii=False) + "\n")
                bar.update()  # a query at a time: with a reranker one block can take long
    bar.close()
    out.with_name(f".mine_stats.rank{rank}.json").write_text(json.dumps(stats))
    stall.enter("the wait for the other ranks' queries")
    dist.barrier()
    summary = {}
    if rank == 0:
        stall.enter("the joining of the ranks' parts")
        total = defaultdict(int)
        for final, name in finals.values():
            join_parts([out.with_name(f".{name}.rank{r}.tmp") for r in range(world)], final)
        for r in range(world):
            p = out.with_name(f".mine_stats.rank{r}.json")
            for k, v in json.loads(p.read_text()).items():
                total[k] += v
            p.unlink()
        summary = {"records": n, "corpus": len(docs), "embedder": cfg.embedder, "precision": enc.precision,
                   "processes": world, **total, "skipped_bad_records": sum(source.rejected.values())}
        out.with_name("mine_summary.json").write_text(json.dumps(summary, indent=2))
        if not cfg.cache_dir:
            shutil.rmtree(store, ignore_errors=True)
        _log(json.dumps(summary))
        _few_mined(summary, cfg, out)
    stall.enter("the wait for rank 0's joining of the parts")
    summary = dist.broadcast_object(summary)
    dist.cleanup()
    return summary


def _few_mined(summary: dict, cfg: MineConfig, out: Path) -> None:
    """A warning where fewer than half the records came out mined: what kept them out and where they are (a
    too strict ``consistency_top_k`` or window left stage 2 with a few records, and its error named only its batch)."""
    mined, n = summary.get("records_with_negatives", 0), summary["records"]
    if mined * 2 >= n:
        return
    why = []
    if summary.get("dropped_inconsistent"):
        why.append(f"{summary['dropped_inconsistent']} kept out by consistency_top_k={cfg.consistency_top_k} "
                   f"(in {out.with_name('inconsistent.jsonl')})")
    if summary.get("no_negatives"):
        why.append(f"{summary['no_negatives']} left with no negative by the window and guards (range_min="
                   f"{cfg.range_min}, range_max={cfg.range_max}, max_score_ratio={cfg.max_score_ratio}, margin="
                   f"{cfg.margin}; in {out.with_name('no_negatives.jsonl')})")
    print(f"warning: mine: only {mined} of {n} records have negatives: {'; '.join(why) or 'none mined'}",
          file=sys.stderr, flush=True)


class _Picked:
    """Records ``picked[i]`` of a source, as records ``i``."""

    def __init__(self, source, picked: np.ndarray) -> None:
        self.source, self.picked = source, picked
        self.rejected = source.rejected

    def __getitem__(self, i: int):
        return self.source[int(self.picked[i])]

    def records(self, idx) -> list:
        return self.source.records(self.picked[np.asarray(list(idx), dtype=np.int64)])


def _gather_queries(qstores: list[np.ndarray], groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Embeddings of a block of queries from their instruction groups' memory-mapped stores."""
    out = np.empty((len(groups), qstores[0].shape[1]), dtype=np.float32)
    for g, mem in enumerate(qstores):
        sel = groups == g
        if sel.any():
            out[sel] = mem[rows[sel]]  # rows ascend within a group: a sequential read
    return out


def _mine_one(r, idx: list[int], scores: list[float], pos_score: float, docs: list[str], cfg: MineConfig,
              reranker, stats, seed: tuple[int, int]) -> tuple[str, dict]:
    """One record's output row, and which file it goes to: mined, none (no negative left), inconsistent."""
    cands = list(zip(idx, scores))
    row = {"query": r.query, "pos": r.pos, "task": r.task, "instruction": r.instruction,
           "pos_score": round(pos_score, 6)} | r.carried(scores=False)  # a teacher's scores: not of these negatives
    pos, not_neg = set(r.pos), set(r.not_neg)
    if cfg.consistency_top_k is not None:
        above = sum(1 for j, s in cands if s > pos_score and docs[j] not in pos and docs[j] not in not_neg)
        if above >= cfg.consistency_top_k:
            stats["dropped_inconsistent"] += 1
            return "inconsistent", row | {"pos_rank": above}  # (at least: only the top range_max are ranked)
    keep, dropped = select_negatives(cands, pos, pos_score, docs, cfg, not_neg)
    for k, v in dropped.items():
        stats[f"dropped_{k}"] += v
    if reranker is not None and keep:
        probs = reranker.score(r.query, [docs[cands[k][0]] for k in keep], instruction=r.instruction)
        stats["dropped_reranker"] += int((probs > cfg.rerank_max_prob).sum())
        keep = [k for k, p in zip(keep, probs.tolist()) if p <= cfg.rerank_max_prob]
    if cfg.sampling == "random" and len(keep) > cfg.num_negatives:
        # seeded per record: the same negatives whatever the number of processes
        keep = sorted(np.random.default_rng(seed).choice(keep, cfg.num_negatives, replace=False).tolist())
    keep = keep[:cfg.num_negatives]
    if not keep:
        stats["no_negatives"] += 1
        return "none", row
    row["neg"] = [docs[cands[k][0]] for k in keep]
    row["neg_scores"] = [round(cands[k][1], 6) for k in keep]
    row["neg_ranks"] = keep
    stats["records_with_negatives"] += 1
    stats["negatives"] += len(keep)
    return "mined", row
