"""EvalConfig and ``run``: every model on every dataset (and Matryoshka dim), one table.

With ``bm25``, the lexical baseline is scored on the same collections and pair files.
Datasets: BEIR/TREC folders (``collections``), held-out pair files (``pairs``: each query against
the pool of the file's positives), STS files (``sts``: JSONL ``{"text1", "text2", "score"}``, Spearman
of cosine against gold). Models: any qwen3train export or sentence-transformers folder, labelled.
Outputs: ``results.jsonl`` (one row per model x dataset x dim), ``results.md`` and, per model (BM25 and
rerankers included) and collection, a TREC run file ``runs/<model>__<collection>[__dim<d>].trec``
(trec_eval, ranx, ir_measures read it; tests/eval/test_trec.py checks our metrics against pytrec_eval
on these files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from qwen3train.data.jsonl import read_jsonl
from qwen3train.eval.encoder import Encoder


@dataclass
class EvalConfig:
    models: dict[str, str] = field(default_factory=dict)
    collections: list[str] = field(default_factory=list)
    pairs: list[str] = field(default_factory=list)
    sts: list[str] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)  # Matryoshka sweep; empty: full dim only
    rerankers: dict[str, str] = field(default_factory=dict)  # label -> reranker folder
    rerank_retriever: str | None = None  # first stage for reranking (an embedder folder)
    rerank_top_k: int = 100
    output_dir: str = "outputs/eval"
    cache_dir: str | None = "outputs/cache/embeddings"
    max_length: int = 512
    # the reranker's budget for its whole prompt (template + instruction + query + document, only the document
    # is cut); null: max_length. The pipeline sets the reranker's training budget (rerank.max_length)
    rerank_max_length: int | None = None
    # the reranker's final score fused with the first stage's (qwen3train.eval.rerank.fuse): its weight, 0..1
    # (1: the reranker alone); null: the reranker alone, as the paper uses it. rerank_fusion_dev_file: choose
    # the weight per reranker on these dev pairs instead (grid 0, 0.1 .. 1; never an evaluation set)
    rerank_fusion: float | None = None
    rerank_fusion_dev_file: str | None = None
    bm25: bool = False  # the lexical baseline (bm25s, qwen3train.eval.bm25) on the collections and pair files
    max_docs: int = 0  # > 0: each collection cut to its relevant documents plus random others (cap_corpus)
    precision: str = "float32"  # embedders' compute dtype (Encoder): float32, bfloat16, float16 or auto
    end_tokens: dict[str, str] = field(default_factory=dict)  # label -> token appended, for raw decoders (base)
    # BEIR's ignore_identical_ids: a document with the query's own id is not a result; null = on where a
    # collection shares ids between queries and documents (ArguAna, Quora, CQADupStack), off elsewhere
    ignore_identical_ids: bool | None = None
    write_runs: bool = True  # TREC run files of every model x collection under <output_dir>/runs
    update_cards: bool = True  # add each qwen3train export's results to its model card (README.md)
    # when no text was encoded and no set scored for this many seconds: one line naming the
    # model and set evaluated, then every thread's stack (qwen3train.stall); nothing is stopped. 0: off
    stall_report_s: float = 900.0
    # on several processes (make eval NGPU=8): the collections' documents are encoded by all of them, in chunks of
    # this many texts (the unit of sharding and of resuming), into cache_dir (or a store removed at the end);
    # the rest (queries, search, pairs, rerankers) runs on rank 0. encode_timeout_min: how long ranks wait for
    # each other's chunks
    encode_chunk_size: int = 16384
    encode_timeout_min: int = 720

    def __post_init__(self) -> None:
        from qwen3train.precision import precision_name

        precision_name(self.precision, "eval.precision")
        rerank_short = self.rerank_max_length is not None and self.rerank_max_length < 2
        if self.max_docs < 0 or self.max_length < 2 or rerank_short:
            raise ValueError("eval.max_docs must be >= 0, eval.max_length and eval.rerank_max_length >= 2")
        if self.stall_report_s < 0:
            raise ValueError("eval.stall_report_s must be >= 0 (0: no report)")
        if self.encode_chunk_size < 1 or self.encode_timeout_min < 1:
            raise ValueError("eval.encode_chunk_size and eval.encode_timeout_min must be >= 1")
        from qwen3train.errors import at_least

        at_least("eval", rerank_top_k=(self.rerank_top_k, 1), dims=(min(self.dims, default=None), 1))
        if self.rerank_fusion is not None and not 0.0 <= self.rerank_fusion <= 1.0:
            raise ValueError(f"eval.rerank_fusion is the reranker's weight, in [0, 1]; got {self.rerank_fusion}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties."""
    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def evaluate_sts(encoder: Encoder, path: str | Path, instruction: str = "Retrieve semantically similar text") -> dict:
    rows = read_jsonl(path)
    texts = sorted({r["text1"] for r in rows} | {r["text2"] for r in rows})  # each text once (Lee: 50, not 2,450)
    vec = encoder.encode_queries(texts, instruction)
    at = {t: i for i, t in enumerate(texts)}
    a = vec[[at[r["text1"]] for r in rows]]
    b = vec[[at[r["text2"]] for r in rows]]
    cos = (a * b).sum(1).numpy()
    return {"spearman": spearman(cos, np.array([float(r["score"]) for r in rows])), "pairs": len(rows)}


def run(cfg: EvalConfig) -> list[dict]:
    """Every row of the table (on rank 0; other ranks of a multi-process run return [] after encoding)."""
    import shutil

    from qwen3train import dist, stall
    from qwen3train.data.collections import cap_corpus, load_spec
    from qwen3train.stall import StallReport

    _of_their_kinds(cfg)
    dist.init(timeout_min=cfg.encode_timeout_min)
    world, store = dist.world_size(), None
    if world > 1 and not cfg.cache_dir:  # the ranks share their chunks through a store of this run
        store = Path(cfg.output_dir) / ".eval_store"
        cfg = replace(cfg, cache_dir=str(store))
    try:
        with StallReport(cfg.stall_report_s, dist.rank() if world > 1 else "evaluation", "eval.stall_report_s",
                         "no text encoded, no set scored"):
            stall.enter("the loading of the collections")
            collections = [cap_corpus(load_spec(c), cfg.max_docs) for c in cfg.collections]
            reranked = {}
            if world > 1:
                _encode_corpora(cfg, collections)
                reranked = _rerank_shards(cfg, collections)
            if not dist.is_main():
                return []  # rank 0 scores with what all of them encoded (read from the store) and reranked
            return _run(cfg, collections, reranked)
    finally:
        if store is not None and dist.is_main():
            shutil.rmtree(store, ignore_errors=True)
        dist.cleanup()


def _of_their_kinds(cfg: EvalConfig) -> None:
    """Each model where its kind belongs (an export of ours says it), checked before any collection loads: a
    reranker among the models (or an embedder among the rerankers) stopped the run after the others were scored."""
    from qwen3train.models.build import of_its_kind
    from qwen3train.models.card import read_meta

    for want, paths in (("embedder", [*cfg.models.values(), cfg.rerank_retriever]), ("reranker", cfg.rerankers.values())):
        for path in filter(None, paths):
            of_its_kind(path, read_meta(path), want, False)


def _encode_corpora(cfg: EvalConfig, collections: list) -> None:
    """Every model's document vectors of every collection, encoded by all ranks into ``cfg.cache_dir`` (chunk
    ``c`` by rank ``c % world``: ``qwen3train.mining.store``), where rank 0's evaluation finds them (the key of
    ``Encoder.cached_docs``: the same weights, settings and texts)."""
    from qwen3train import dist, stall
    from qwen3train.mining.store import encode_to_store

    texts = [list(col.corpus.values()) for col in collections]
    seen = set()
    retriever = [("first stage", cfg.rerank_retriever, None)] if cfg.rerankers and cfg.rerank_retriever else []
    for label, path, end_token in [(k, v, cfg.end_tokens.get(k)) for k, v in cfg.models.items()] + retriever:
        key = _weights_key(path, end_token)
        if key in seen or not texts:
            continue
        seen.add(key)
        stall.enter(f"the loading of {label}")
        enc = Encoder(path, max_length=cfg.max_length, precision=cfg.precision, end_token=end_token,
                      label=label if dist.is_main() else None)
        for docs in texts:
            encode_to_store(enc, docs, cfg.cache_dir, chunk_size=cfg.encode_chunk_size,
                            log=lambda m: print(f"eval: {m}", flush=True))
        del enc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _rerank_shards(cfg: EvalConfig, collections: list) -> dict:
    """Each reranker's scores of each collection's first stage, every rank scoring its share of the queries (every
    ``world``-th), gathered: {(reranker label, collection name): {query: [(document, probability)]}}."""
    from qwen3train import dist, stall
    from qwen3train.eval.rerank import first_stage, load_reranker, rerank

    if not cfg.rerankers or not cfg.rerank_retriever:
        return {}
    rank, world = dist.rank(), dist.world_size()
    firsts = []
    for col in collections:  # from the store the ranks filled: every rank gets the same candidates
        stall.enter(f"the first stage of {col.name}")
        firsts.append(first_stage(cfg.rerank_retriever, col, cfg.rerank_top_k, cfg.cache_dir, cfg.max_length,
                                  cfg.precision, cfg.ignore_identical_ids))
    out = {}
    for label, path in cfg.rerankers.items():
        stall.enter(f"the loading of {label}")
        rr = load_reranker(path, cfg.precision, cfg.rerank_max_length or cfg.max_length)
        for col, (instr, first) in zip(collections, firsts):
            stall.enter(f"{label} reranking its share of {col.name}")
            mine = rerank(rr, col, first, instr, sorted(first)[rank::world], 16,
                          f"rerank {col.name} top-{cfg.rerank_top_k} (rank {rank})" if rank == 0 else None)
            print(f"eval: {label} reranked {len(mine)} of {len(first)} queries of {col.name} on rank {rank}", flush=True)
            stall.enter(f"the wait for the other ranks' reranking of {col.name}")
            merged = {q: v for part in dist.all_gather_object(mine) for q, v in part.items()}
            out[(label, col.name)] = {q: merged[q] for q in first}  # the first stage's order
        del rr
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _run(cfg: EvalConfig, collections: list, reranked: dict) -> list[dict]:
    from qwen3train import stall
    from qwen3train.eval.pairs import evaluate_pairs
    from qwen3train.eval.rerank import evaluate_rerank
    from qwen3train.eval.retrieval import evaluate_collection

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    seen: dict[str, str] = {}  # weights -> the label that scored them
    for label, path in cfg.models.items():
        twin = seen.setdefault(_weights_key(path, cfg.end_tokens.get(label)), label)
        if twin != label:  # the same weights under another name (a merge that fell back to a checkpoint)
            rows += [dict(r, model=label) for r in rows if r["model"] == twin]
            runs = Path(cfg.output_dir) / "runs"
            for f in sorted(runs.glob(f"{_safe(twin)}__*")) if cfg.write_runs else []:
                f_new = runs / (_safe(label) + f.name[len(_safe(twin)):])
                tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)  # write_trec_run's tag rule
                f_new.write_text("".join(ln.rsplit(" ", 1)[0] + f" {tag}\n" for ln in f.read_text().splitlines()))
            print(f"eval: {label} has the weights of {twin}: its rows are {twin}'s", flush=True)
            continue
        # one load per model; each set encoded once (``Encoder.remember``) and scored at every Matryoshka dim
        # from the same full-dimension vectors; the rows in the order of dims, then sets
        stall.enter(f"the loading of {label}")
        enc = Encoder(path, max_length=cfg.max_length, precision=cfg.precision, end_token=cfg.end_tokens.get(label),
                      label=label)
        enc.remember = bool(cfg.dims)
        dims = [None] + list(cfg.dims)
        by_dim: list[list[dict]] = [[] for _ in dims]  # the rows, dims first, sets in order within each
        for kind, item in [("col", c) for c in collections] + [("pairs", p) for p in cfg.pairs] + \
                [("sts", f) for f in cfg.sts]:
            name = item.name if kind == "col" else dataset_name(item)
            for d, dim in enumerate(dims):
                enc.dim = dim
                stall.enter(f"{label}{f' (dim {dim})' if dim else ''} on {name}")
                if kind == "col":
                    r = evaluate_collection(path, item, encoder=enc, cache_dir=cfg.cache_dir, dim=dim,
                                            ignore_identical_ids=cfg.ignore_identical_ids)
                    save_run(cfg, r.pop("run"), label, item.name, dim)
                    r = {"dataset": r["dataset"], **{k: r[k] for k in ("ndcg@10", "recall@100", "mrr@10", "queries")}}
                elif kind == "pairs":
                    r = {"dataset": name, **evaluate_pairs(path, item, encoder=enc)}
                else:
                    r = {"dataset": name, **evaluate_sts(enc, item)}
                by_dim[d].append({"model": label, "dataset": r.pop("dataset"), "dim": dim, **r})
            enc.forget()  # the next set's vectors only
        rows += [row for part in by_dim for row in part]
        del enc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if cfg.bm25:
        from qwen3train.eval.bm25 import LABEL, evaluate_collection_bm25, evaluate_pairs_bm25
        from qwen3train.progress import Progress

        stall.enter("bm25")
        with Progress(len(collections) + len(cfg.pairs), "bm25", "sets") as bar:
            for col in collections:
                r = evaluate_collection_bm25(col, cfg.ignore_identical_ids)
                save_run(cfg, r.pop("run"), "bm25", col.name, None)
                rows.append({"model": LABEL, "dataset": r["dataset"], "dim": None,
                             **{k: r[k] for k in ("ndcg@10", "recall@100", "mrr@10", "queries")}})
                bar.update()
            for pf in cfg.pairs:
                rows.append({"model": LABEL, "dataset": dataset_name(pf), "dim": None, **evaluate_pairs_bm25(pf)})
                bar.update()
    for label, path in cfg.rerankers.items():
        if not cfg.rerank_retriever:
            from qwen3train.errors import ConfigError

            raise ConfigError("eval.rerankers needs eval.rerank_retriever (the first-stage embedder)")
        kw = dict(top_k=cfg.rerank_top_k, max_length=cfg.max_length, precision=cfg.precision,
                  rerank_max_length=cfg.rerank_max_length)
        weight = cfg.rerank_fusion
        if cfg.rerank_fusion_dev_file:
            from qwen3train.eval.rerank import choose_fusion

            stall.enter(f"{label}: the choice of its fusion weight on {cfg.rerank_fusion_dev_file}")
            chosen = choose_fusion(cfg.rerank_retriever, path, cfg.rerank_fusion_dev_file, cache_dir=cfg.cache_dir, **kw)
            weight = chosen["weight"]
            out.mkdir(parents=True, exist_ok=True)
            (out / f"fusion_{_safe(label)}.json").write_text(json.dumps(chosen, indent=2))
            print(f"[eval] {label}: fusion weight {weight:.1f} chosen on {cfg.rerank_fusion_dev_file} "
                  f"(dev nDCG@10 {chosen['dev_ndcg@10']})", flush=True)
        for col in collections:
            stall.enter(f"{label} reranking {col.name}")
            r = evaluate_rerank(cfg.rerank_retriever, path, col, cache_dir=cfg.cache_dir,
                                ignore_identical_ids=cfg.ignore_identical_ids, fusion=weight,
                                scores=reranked.get((label, col.name)), **kw)
            save_run(cfg, r.pop("run"), f"{label}-rerank-top{cfg.rerank_top_k}", col.name, None)
            rows.append({"model": f"{label} (rerank top-{cfg.rerank_top_k})", "dataset": r["dataset"], "dim": None,
                         **{k: r["after"][k] for k in ("ndcg@10", "recall@100", "mrr@10")},
                         "ndcg@10_before": r["before"]["ndcg@10"],
                         **({"fusion": weight, "ndcg@10_alone": r["alone"]["ndcg@10"]} if weight is not None else {})})
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results.md").write_text(table(rows))
    if cfg.update_cards:
        from qwen3train.models.card import add_evaluation

        for label, path in list(cfg.models.items()) + list(cfg.rerankers.items()):
            mine = [r for r in rows if r["model"] == label or r["model"].startswith(f"{label} (rerank")]
            if mine and Path(path).is_dir():
                add_evaluation(path, mine)
    print(table(rows))
    return rows


def _weights_key(path: str, end_token: str | None) -> str:
    """Names a model folder by the bytes of its weights and config (a path when it has none here)."""
    import hashlib

    from qwen3train.integrity import file_digest

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json")) if folder.is_dir() else []
    if not any(f.suffix == ".safetensors" for f in files):
        return f"path:{path}:{end_token}"
    h = hashlib.sha256(f"{end_token}".encode())
    for f in files:
        h.update(f"{f.name}:{file_digest(f)}".encode())
    return h.hexdigest()


def save_run(cfg: EvalConfig, run: dict, label: str, dataset: str, dim: int | None) -> None:
    from qwen3train.eval.metrics import write_trec_run

    if cfg.write_runs:
        name = f"{label}__{dataset}" + (f"__dim{dim}" if dim else "")
        write_trec_run(run, Path(cfg.output_dir) / "runs" / f"{_safe(name)}.trec", tag=label)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-@" else "_" for c in name)


def dataset_name(path: str | Path) -> str:
    """``<folder>/<file stem>``: pair files of different stages are often all called heldout.jsonl."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}"


def table(rows: list[dict]) -> str:
    metrics = [m for m in ("ndcg@10", "ndcg@10_before", "recall@100", "mrr@10", "spearman")
               if any(m in r for r in rows)]
    head = "| model | dataset | dim | " + " | ".join(metrics) + " |\n|---|---|---|" + "---|" * len(metrics) + "\n"
    body = "".join(f"| {r['model']} | {r['dataset']} | {r['dim'] or 'full'} | " +
                   " | ".join(f"{r[m]:.4f}" if m in r else "" for m in metrics) + " |\n" for r in rows)
    return head + body
