"""`datasets` sources, offline on local files: Arrow (indexed like a file) and streamed (this rank's
shard, validated as it arrives, distinct positives per batch, exact resume)."""

from __future__ import annotations

import json

import pytest

from qwen3train.data.hf import DatasetRef, StreamingSource, label, load
from qwen3train.data.records import DataError
from qwen3train.data.sources import IndexedSource, MixtureSource


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs(n, dup_every=0):
    return [{"query": f"q{i}", "pos": [f"p{i % dup_every}" if dup_every else f"p{i}"], "task": "t"} for i in range(n)]


def spec(path, **kw):
    return MixtureSource(dataset="json", data_files=[str(path)], **kw)


def test_arrow_dataset_is_indexed_once_like_a_file(tmp_path, monkeypatch):
    f = write(tmp_path / "d.jsonl", pairs(30))
    m = spec(f)
    src = IndexedSource([DatasetRef(label(m), load(m, streaming=False))], index_dir=tmp_path / "ix")
    assert len(src) == 30 and src[7].query == "q7" and src.index_stats["built"]
    from qwen3train.data import index

    monkeypatch.setattr(index, "scan_unit", lambda *a, **k: pytest.fail("rescanned"))
    again = IndexedSource([DatasetRef(label(m), load(m, streaming=False))], index_dir=tmp_path / "ix")
    assert again.index_stats["built"] == [] and again[29].query == "q29"


def _drain(src, batches, size):
    return [[(row, r.query) for row, r in src.take(size)] for _ in range(batches)]


def test_streamed_batches_have_distinct_positives_and_resume_exactly(tmp_path):
    f = write(tmp_path / "d.jsonl", pairs(40, dup_every=13))  # positives repeat: some rows must wait
    ref_src = StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=8)
    ref = _drain(ref_src, 25, 4)  # 100 rows > 40: crosses epochs
    for batch in ref:
        assert len({q for _, q in batch}) == 4
        pos = [int(q[1:]) % 13 for _, q in batch]
        assert len(set(pos)) == 4  # distinct positives within the batch
    assert ref_src.epoch >= 2
    first = StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=8)
    _drain(first, 9, 4)
    cursor = json.loads(json.dumps(first.cursor()))
    resumed = StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=8)
    resumed.seek(cursor)
    assert _drain(resumed, 16, 4) == ref[9:]


def test_ranks_read_disjoint_shards(tmp_path):
    f = write(tmp_path / "d.jsonl", pairs(24))
    seen = []
    for rank in (0, 1):
        src = StreamingSource(spec(f), seed=0, rank=rank, world=2, shuffle_buffer=4)
        got = [r.query for _, r in src.take(12)]
        assert src.epoch == 0
        seen.append(set(got))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24


def test_streamed_bad_rows_raise_or_are_kept(tmp_path):
    rows = pairs(6)
    rows[3] = {"query": "q3", "pos": "a string"}
    f = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"hf:json\[train\].*row \d+: field 'pos'"):
        StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=1).take(6)
    src = StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=1, on_error="skip",
                          rejects_path=tmp_path / "rej.jsonl")
    src.take(5)
    assert sum(src.rejected.values()) == 1
    rej = [json.loads(x) for x in (tmp_path / "rej.rank0.jsonl").read_text().splitlines()]
    assert rej[0]["field"] == "pos" and rej[0]["raw"]["pos"] == "a string"
    mixed = write(tmp_path / "m.jsonl", [{"query": "a", "pos": ["x"], "task": "t"}, {"query": "b", "pos": ["y"],
                                                                                       "task": "u"}])
    with pytest.raises(DataError, match="one task per streaming source"):
        StreamingSource(spec(mixed), seed=0, rank=0, world=1, shuffle_buffer=1).take(2)
