"""Bad records are named precisely; skip mode keeps rejects; batch plans are single-task, duplicate-free."""

from __future__ import annotations

import json

import pytest

from qwen3train.data.batching import plan_epoch
from qwen3train.data.records import DataError
from qwen3train.data.sources import IndexedSource


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}


@pytest.mark.parametrize("bad,field", [
    ('{"query": "q", "pos": ["p"]', "<json>"),
    ({"pos": ["p"]}, "query"),
    ({"query": "q", "pos": "p"}, "pos"),
    ({"query": "q", "pos": []}, "pos"),
    ({"query": "q", "pos": ["p", 3]}, "pos[1]"),
    ({"query": "q", "pos": ["p"], "neg": "n"}, "neg"),
    ({"query": "q", "pos": ["p"], "task": 5}, "task"),
    ({"query": "  ", "pos": ["p"]}, "query"),
])
def test_error_names_file_line_and_field(tmp_path, bad, field):
    f = write(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        IndexedSource([f])
    assert err.value.where == f"{f}:3" and err.value.field == field
    assert f"{f}:3" in str(err.value) and f"'{field}'" in str(err.value)


def test_missing_negatives_when_required(tmp_path):
    f = write(tmp_path / "d.jsonl", [GOOD, {"query": "q2", "pos": ["p2"]}])
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'neg'"):
        IndexedSource([f], num_hard_negatives=2)


def test_skip_mode_counts_and_keeps_rejects(tmp_path):
    f = write(tmp_path / "d.jsonl", [GOOD, "not json", {"query": "q", "pos": "p"}, "", GOOD])
    src = IndexedSource([f], on_error="skip", rejects_path=tmp_path / "rej.jsonl")
    assert len(src) == 2 and sum(src.rejected.values()) == 2
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rej] == [f"{f}:2", f"{f}:3"] and rej[0]["raw"] == "not json"
    assert src[1].query == "q" and src[0].neg == ["n1", "n2"]


def test_parquet_and_hf_disk_sources(tmp_path):
    import datasets

    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"], "task": "t"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    for p in (tmp_path / "d.parquet", tmp_path / "hf"):
        src = IndexedSource([p], num_hard_negatives=1)
        assert len(src) == 5 and src[3].query == "q3" and src[3].neg == ["n3"]


def test_line_separator_u2028_inside_text(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"query": "a\u2028b", "pos": ["p\u2028q"]}, GOOD])
    src = IndexedSource([f])
    assert len(src) == 2 and src[0].query == "a\u2028b"


@pytest.mark.parametrize("version", [1, 2])
def test_plan_is_single_task_duplicate_free_and_deterministic(tmp_path, version):
    """Version 1: single-task batches only, every task's leftovers dropped. Version 2: the same single-task
    batches, then the leftovers of all tasks pooled into mixed batches (a task smaller than a batch, C here,
    is trained on). Both: no duplicate positive in a batch, deterministic, every record used or counted."""
    rows = []
    for i in range(60):
        rows.append({"query": f"a{i}", "pos": [f"shared{i % 7}"], "task": "A"})  # many duplicate positives
        rows.append({"query": f"b{i}", "pos": [f"b{i}"], "task": "B"})
    rows += [{"query": f"c{i}", "pos": [f"c{i}"], "task": "C"} for i in range(4)]  # fewer than a batch
    src = IndexedSource([write(tmp_path / "d.jsonl", rows)])
    batches, stats = plan_epoch(src, 6, seed=1, epoch=0, version=version)
    assert batches and stats["deferred_duplicates"] > 0
    mixed = 0
    for b in batches:
        assert len(b) == 6
        tasks = {src.task_names[src.task_idx[i]] for i, _ in b}
        mixed += len(tasks) > 1
        hashes = [src.positive_hash(i, j) for i, j in b]
        assert len(set(hashes)) == len(hashes)
    again, _ = plan_epoch(src, 6, seed=1, epoch=0, version=version)
    assert again == batches
    assert plan_epoch(src, 6, seed=1, epoch=1, version=version)[0] != batches
    used = sum(len(b) for b in batches) + stats["dropped_tail"]
    assert used == len(src)
    c_used = sum(src.task_names[src.task_idx[i]] == "C" for b in batches for i, _ in b)
    if version == 1:
        assert mixed == 0 and c_used == 0 and "mixed_batches" not in stats
    else:
        assert mixed == stats["mixed_batches"] >= 1 and c_used >= 1
        seen = {i for e in range(8) for b in plan_epoch(src, 6, seed=1, epoch=e, version=2)[0] for i, _ in b
                if src.task_names[src.task_idx[i]] == "C"}
        assert len(seen) == 4  # the pool's own tail is left out, other records in other epochs
        assert stats["dropped_tail"] < plan_epoch(src, 6, seed=1, epoch=0, version=1)[1]["dropped_tail"]
        assert len(batches) > len(plan_epoch(src, 6, seed=1, epoch=0, version=1)[0])


def test_a_negative_that_is_a_positive_or_not_neg_is_not_drawn():
    """Data mined without excluding the positives (or with duplicates) lists a positive, or a text judged partly
    relevant, among the negatives. Over 50 epochs neither is drawn while a real negative remains: the reranker's
    group never asks it to say no to a positive (checked through its collator), the embedder gets no wasted
    slot; a record whose every negative is such a text keeps its list (nothing better to draw). Would catch the
    draw from the raw list (each bad text comes up in ~2/3 of the epochs)."""
    from qwen3train.data.collate import RerankCollator, sample_negatives
    from qwen3train.data.instructions import Instructions
    from qwen3train.data.records import Record

    rec = Record("q", ["p1", "p2"], ["p2", "n1", "partly", "n2"], not_neg=["partly"])
    drawn = {n for e in range(50) for n in sample_negatives(rec, 2, 0, e, 7)}
    assert drawn == {"n1", "n2"}
    docs = []
    collate = RerankCollator(lambda q, d, i: docs.extend(d) or [[1]] * len(d), Instructions(), k=3, seed=0)
    for e in range(20):
        collate([(7, rec, 0)], e)
    groups = [docs[i:i + 4] for i in range(0, len(docs), 4)]
    assert all(g[0] == "p1" and set(g[1:]) <= {"n1", "n2"} for g in groups)
    only_bad = Record("q", ["p1"], ["p1"])
    assert sample_negatives(only_bad, 2, 0, 0, 1) == ["p1", "p1"]


def test_a_teacher_score_travels_with_its_negative_and_its_positive():
    """Each row's teacher scores are those of the positive it trains on and of the K negatives drawn (in their
    drawn order, a negative that is a positive skipped), NaN for a record without scores. Would catch scores
    taken in list order rather than the drawn one (the distillation target of another text)."""
    import math

    from qwen3train.data.collate import sample_negatives, teacher_scores, negative_indices
    from qwen3train.data.records import Record

    score = {"p1": 9.0, "p2": 8.0, "n1": 1.0, "n2": 2.0, "n3": 3.0, "n4": 4.0}
    rec = Record("q", ["p1", "p2"], ["n1", "p2", "n2", "n3", "n4"], pos_scores=[9.0, 8.0],
                 neg_scores=[1.0, 8.0, 2.0, 3.0, 4.0])
    bare = Record("r", ["x"], ["y", "z", "w"])
    orders = set()
    for e in range(6):
        picks = [negative_indices(rec, 3, 0, e, 5), negative_indices(bare, 3, 0, e, 6)]
        assert [rec.neg[i] for i in picks[0]] == sample_negatives(rec, 3, 0, e, 5)
        t = teacher_scores([(5, rec, 1), (6, bare, 0)], picks)
        drawn = sample_negatives(rec, 3, 0, e, 5)
        assert t[0].tolist() == [score["p2"]] + [score[n] for n in drawn] and "p2" not in drawn
        assert all(math.isnan(x) for x in t[1].tolist())
        orders.add(tuple(drawn))
    assert len(orders) > 1  # the draws differ between epochs: the scores follow them
