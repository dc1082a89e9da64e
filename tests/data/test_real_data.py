"""The real-backbone recipe's data: Wikipedia pairs split by article, the Lee STS set, dev splits."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gensim")

from qwen3train.data import real  # noqa: E402


def test_lee_sts_is_the_upper_triangle_of_the_human_matrix():
    """1,225 pairs (50 choose 2) with the matrix's values: catches reading the zero lower triangle or the
    diagonal (score 1 for a document with itself) and a document list off by one."""
    rows = real.lee_sts()
    assert len(rows) == 1225
    assert rows[0]["score"] == pytest.approx(0.3)  # matrix[0][1] of similarities0-1.txt
    assert rows[0]["text1"].startswith("The national executive of the strife-torn Democrats")
    assert all(0 < r["score"] <= 1 for r in rows)  # no zero lower triangle
    assert sum(r["score"] == 1 for r in rows) < 5  # not the diagonal (3 pairs were rated identical)
    assert all(r["text1"] != r["text2"] for r in rows)


def test_build_splits_by_article_and_keeps_sources_apart(tmp_path):
    """No dev article has a training pair or a stage-0 passage; docstring dev pairs are not trained on;
    the docstring held-out evaluation file is never among training or dev pairs."""
    from qwen3train.data import demo

    demo.build(tmp_path / "demo")
    stats = real.build(tmp_path / "real", tmp_path / "demo")
    load = lambda name: [json.loads(x) for x in (tmp_path / "real" / name).read_text().split("\n") if x.strip()]
    train, dev, corpus = load("train.jsonl"), load("dev.jsonl"), load("corpus.jsonl")
    dev_articles = {r["article"] for r in dev if r.get("task") == "wiki"}
    assert dev_articles and not dev_articles & {r["article"] for r in train if r.get("task") == "wiki"}
    assert not any(c["_id"].split("#")[0] in {f"wiki:{a}" for a in dev_articles} for c in corpus)
    assert not {r["query"] for r in dev if r.get("task") != "wiki"} & {r["query"] for r in train}
    held_rows = [json.loads(x) for x in (tmp_path / "demo" / "heldout.jsonl").read_text().split("\n") if x]
    assert not {r["query"] for r in held_rows} & {r["query"] for r in train + dev if r.get("task") != "wiki"}
    # nor is a held-out passage, under another query (the same docstring in two classes): 4 such pairs
    # in the demo data were trained on before the filter
    assert not {r["pos"][0] for r in held_rows} & {r["pos"][0] for r in train + dev + corpus if "pos" in r}
    assert not any(c["text"].endswith(" " + r["pos"][0]) for c in corpus for r in held_rows)  # stage-0 corpus
    assert stats["docstring_dropped_heldout_passage"] > 0
    assert stats["wiki_articles"] == 106 and stats["wiki_train"] > 1000
    lead = next(r for r in train if r["query"] == "Anarchism")
    assert lead["pos"][0].startswith("Anarchism is a political philosophy")  # markup stripped, lead chosen
