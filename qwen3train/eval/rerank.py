"""Reranking evaluation: a first-stage retriever's top-k on a BEIR/TREC collection, rescored by a
reranker; metrics before and after (as the paper evaluates on the top-100 of Qwen3-Embedding-0.6B)."""

from __future__ import annotations

from pathlib import Path

from qwen3train.data.collections import Collection, load_collection
from qwen3train.eval.encoder import Encoder, resolve_precision
from qwen3train.eval.metrics import evaluate_run
from qwen3train.eval.retrieval import collection_instruction, retrieve


def evaluate_rerank(retriever: str | Path, reranker: str | Path, collection, *, top_k: int = 100,
                    batch_size: int = 16, cache_dir: str | None = None, max_length: int = 512,
                    precision: str = "float32", ignore_identical_ids: bool | None = None,
                    rerank_max_length: int | None = None) -> dict:
    """``max_length``: the first stage's token budget; ``rerank_max_length``: the reranker's whole prompt
    (template, instruction, query and the document, of which only the document is cut); None: ``max_length``."""
    import torch

    from qwen3train.models.build import ModelConfig, build_reranker

    col = collection if isinstance(collection, Collection) else load_collection(collection)
    # the first stage as make eval scores that embedder (its query instruction: the collection's, else the
    # default); before, an unregistered collection's first-stage queries went without an instruction
    instr = collection_instruction(col)
    first = retrieve(Encoder(retriever, max_length=max_length, precision=precision, label=f"first stage {col.name}"),
                     col, instr, top_k, cache_dir, ignore_identical_ids)
    rr = build_reranker(ModelConfig(name_or_path=str(reranker), padding_side="left", dtype=resolve_precision(precision)),
                        max_length=rerank_max_length or max_length)
    if torch.cuda.is_available():
        rr.cuda()
    from qwen3train.progress import Progress

    second = {}
    with Progress(len(first), f"rerank {col.name} top-{top_k}", "queries") as bar:
        for qid, cands in first.items():
            probs = rr.score(col.queries[qid], [col.corpus[d] for d, _ in cands],
                             instruction=instr or DEFAULT_RERANK_INSTRUCTION, batch_size=batch_size)
            second[qid] = [(d, float(p)) for (d, _), p in zip(cands, probs.tolist())]
            bar.update()
    before, after = evaluate_run(first, col.qrels), evaluate_run(second, col.qrels)
    return {"dataset": col.name, "top_k": top_k, "before": before, "after": after,
            "delta_ndcg@10": after["ndcg@10"] - before["ndcg@10"], "run": second}
