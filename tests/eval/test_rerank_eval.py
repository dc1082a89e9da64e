"""Reranking a first stage's top-k on a real collection reports nDCG@10 before and after."""

from __future__ import annotations

from conftest import FIXTURES
from qwen3train.eval.rerank import evaluate_rerank


def test_rerank_before_equals_make_eval_and_only_reorders(tiny_model_dir, tmp_path):
    """The reranker's "before" is the first stage as `make eval` scores that embedder. On a collection the
    instruction registry does not know (a renamed copy of ARCD), its queries used to go without an
    instruction while `make eval` gave them the default one, so "before" was another (weaker) ranking
    than the embedder's own row. Reranking only reorders the top-k: recall within it cannot change."""
    import shutil

    from qwen3train.eval.retrieval import evaluate_collection

    col = tmp_path / "my_collection"
    shutil.copytree(FIXTURES / "arcd", col)
    r = evaluate_rerank(tiny_model_dir, tiny_model_dir, col, top_k=100, max_length=128, cache_dir=str(tmp_path))
    want = evaluate_collection(tiny_model_dir, col, max_length=128, cache_dir=str(tmp_path))
    for m in ("ndcg@10", "recall@100", "mrr@10"):
        assert abs(r["before"][m] - want[m]) < 1e-6, m
    assert r["before"]["queries"] == r["after"]["queries"] == 50
    assert abs(r["before"]["recall@100"] - r["after"]["recall@100"]) < 1e-9
    assert 0.0 <= r["after"]["ndcg@10"] <= 1.0 and r["delta_ndcg@10"] == r["after"]["ndcg@10"] - r["before"]["ndcg@10"]


def test_the_reranker_reads_its_own_budget(tiny_model_dir, tmp_path, monkeypatch):
    """rerank_max_length reaches the reranker (the first stage keeps max_length): before, the reranker
    always got the first stage's budget."""
    import qwen3train.models.build as build

    seen = []
    real = build.build_reranker

    def spy(cfg, **kw):
        seen.append(kw.get("max_length"))
        return real(cfg, **kw)

    monkeypatch.setattr(build, "build_reranker", spy)
    evaluate_rerank(tiny_model_dir, tiny_model_dir, FIXTURES / "arcd", top_k=5, max_length=64,
                    rerank_max_length=200, cache_dir=str(tmp_path))
    evaluate_rerank(tiny_model_dir, tiny_model_dir, FIXTURES / "arcd", top_k=5, max_length=64,
                    cache_dir=str(tmp_path))
    assert seen == [200, 64]
