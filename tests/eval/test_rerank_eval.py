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


def test_fusion_mixes_the_two_rankings_on_each_querys_own_scale():
    """``fuse`` against a hand computation: first-stage scores 0.9/0.8/0.5 scale to 1/0.75/0, reranker
    scores 0.1/0.9/0.5 to 0/1/0.5; at weight 0.5 the fused scores are 0.5/0.875/0.25 (order b, a, c).
    Weight 0 keeps the first stage's order, 1 the reranker's; a query whose scores are all equal gets 0s
    (no division by zero). Catches raw scores mixed unscaled (the reranker's probabilities would swamp
    the cosines) or the weight on the wrong side."""
    from qwen3train.eval.rerank import fuse

    first = {"q": [("a", 0.9), ("b", 0.8), ("c", 0.5)], "flat": [("x", 0.3), ("y", 0.3)]}
    second = {"q": [("a", 0.1), ("b", 0.9), ("c", 0.5)], "flat": [("y", 0.7), ("x", 0.7)]}
    half = dict(fuse(first, second, 0.5)["q"])
    assert all(abs(half[d] - v) < 1e-12 for d, v in {"a": 0.5, "b": 0.875, "c": 0.25}.items())

    def order(w):
        return [d for d, _ in sorted(fuse(first, second, w)["q"], key=lambda x: -x[1])]

    assert order(0.0) == ["a", "b", "c"] and order(1.0) == ["b", "c", "a"] and order(0.5) == ["b", "a", "c"]
    assert fuse(first, second, 0.3)["flat"] == [("x", 0.0), ("y", 0.0)]


def test_fused_evaluation_reports_the_reranker_alone_beside_it(tiny_model_dir, tmp_path):
    """With ``fusion`` the row's "after" is the fused ranking's and "alone" the reranker's own; weight 1.0
    gives exactly the reranker alone, weight 0.0 exactly the first stage (a fusion that ignored its
    weight, or reported the reranker's figures as the fused ones, fails)."""
    kw = dict(top_k=10, max_length=64, cache_dir=str(tmp_path))
    plain = evaluate_rerank(tiny_model_dir, tiny_model_dir, FIXTURES / "arcd", **kw)
    one = evaluate_rerank(tiny_model_dir, tiny_model_dir, FIXTURES / "arcd", fusion=1.0, **kw)
    zero = evaluate_rerank(tiny_model_dir, tiny_model_dir, FIXTURES / "arcd", fusion=0.0, **kw)
    assert plain["fusion"] is None and plain["after"] == plain["alone"]
    assert abs(one["after"]["ndcg@10"] - plain["after"]["ndcg@10"]) < 1e-9
    assert abs(zero["after"]["ndcg@10"] - zero["before"]["ndcg@10"]) < 1e-9
    assert zero["alone"] == plain["alone"] and plain["after"]["ndcg@10"] != plain["before"]["ndcg@10"]


def _dev_pairs(tmp_path, n=16):
    """Dev pairs (query, positive) made from the ARCD fixture: what the merge gate's dev file holds."""
    import json

    from qwen3train.data.collections import load_collection

    col = load_collection(FIXTURES / "arcd")
    rows = []
    for qid, rels in sorted(col.qrels.items()):
        pos = [d for d, g in rels.items() if g > 0 and d in col.corpus]
        if pos and len(rows) < n:
            rows.append({"query": col.queries[qid], "pos": [col.corpus[pos[0]]]})
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, rows


def test_the_fusion_weight_is_chosen_on_dev_pairs(tiny_model_dir, tmp_path):
    """The weight is the grid point with the best dev nDCG@10 (the smaller on a tie), and that curve value is
    what a fused evaluation of the dev pairs at that weight gives (an independent run of evaluate_rerank).
    Catches a choice made on anything but the dev curve, or a curve computed on another ranking."""
    from qwen3train.eval.rerank import FUSION_GRID, choose_fusion, pairs_collection

    dev, rows = _dev_pairs(tmp_path)
    kw = dict(top_k=5, max_length=64)
    got = choose_fusion(tiny_model_dir, tiny_model_dir, dev, **kw)
    curve = {float(w): v for w, v in got["dev_ndcg@10"].items()}
    assert got["queries"] == len(rows) == 16 and sorted(curve) == list(FUSION_GRID)
    best = max(curve.values())
    assert curve[got["weight"]] == best and all(v < best for w, v in curve.items() if w < got["weight"])
    col = pairs_collection(dev)
    assert sorted(col.corpus.values()) == sorted({r["pos"][0] for r in rows})
    again = evaluate_rerank(tiny_model_dir, tiny_model_dir, col, fusion=got["weight"], **kw)
    assert abs(again["after"]["ndcg@10"] - best) < 1e-4


def test_an_export_of_the_other_track_is_refused_where_it_means_nothing(tiny_model_dir, tmp_path, capsys):
    """An embedder and a reranker of one backbone load as each other (AutoModel takes the LM's layers, the LM its
    tied head): a reranker export given to `make eval models=...` was scored as an embedder, an embedder export given
    as a reranker scored with a head it never trained, without a word. Where it is evaluated, mined or scored with
    it is one line (`make eval`: before any collection loads); a stage that trains from it says so and goes on."""
    import pytest

    from qwen3train.errors import ConfigError
    from qwen3train.eval.run import EvalConfig, run
    from qwen3train.models.build import ModelConfig, build_embedder, build_reranker
    from qwen3train.models.export import export_embedder, export_reranker

    emb = export_embedder(build_embedder(ModelConfig(name_or_path=str(tiny_model_dir))), tmp_path / "emb",
                          instruction="Given a question, find its answer")
    rr = export_reranker(build_reranker(ModelConfig(name_or_path=str(tiny_model_dir))), tmp_path / "rr")
    with pytest.raises(ConfigError, match=r"rr is a reranker export \(its qwen3train.json\), not an embedder: it scores"):
        build_embedder(ModelConfig(name_or_path=str(rr)))
    with pytest.raises(ConfigError, match=r"emb is an embedder export \(its qwen3train.json\), not a reranker: it embeds"):
        build_reranker(ModelConfig(name_or_path=str(emb)))
    build_embedder(ModelConfig(name_or_path=str(rr)), train_precision="fp32")
    assert f"warning: {rr} is a reranker export: this stage trains an embedder from its weights" in capsys.readouterr().out
    build_embedder(ModelConfig(name_or_path=str(emb)))  # each where it belongs: nothing said
    build_reranker(ModelConfig(name_or_path=str(rr)))
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"emb is an embedder export .* not a reranker"):  # (no such collection)
        run(EvalConfig(models={"e": str(emb)}, rerankers={"r": str(emb)}, rerank_retriever=str(emb),
                       collections=[str(tmp_path / "no_collection")], output_dir=str(tmp_path / "ev")))
