"""`datasets` sources, offline on local files: Arrow (indexed like a file) and streamed (this rank's
shard, validated as it arrives, distinct positives per batch, exact resume)."""

from __future__ import annotations

import json

import pytest

from qwen3train.data.hf import DatasetRef, StreamingSource, label, load
from qwen3train.data.records import DataError
from qwen3train.data.sources import IndexedSource, MixtureSource
from qwen3train.errors import ConfigError


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
    resumed.seek([cursor])
    assert _drain(resumed, 16, 4) == ref[9:]


def _sources(files, world, **kw):
    m = MixtureSource(dataset="json", data_files=[str(f) for f in files], stream_split=kw.get("split", "auto"))
    return [StreamingSource(m, seed=0, rank=r, world=world,
                            shuffle_buffer=kw.get("buffer", 4)) for r in range(world)]


def _epoch0(src):
    """The rest of this rank's epoch 0, a row at a time (a row of epoch 1 is read, then dropped)."""
    out = []
    while True:
        (_, rec), = src.take(1)
        if src.epoch > 0:
            return out
        out.append(rec.query)


@pytest.mark.parametrize("files,before,after,split", [(1, 2, 1, "auto"), (4, 1, 2, "auto"), (4, 2, 3, "auto"),
                                                     (4, 4, 1, "auto"), (4, 2, 4, "auto"), (3, 2, 1, "files"),
                                                     (3, 2, 3, "files")])
def test_a_streamed_source_resumes_on_another_process_count(tmp_path, files, before, after, split):
    """A job requeued on another number of GPUs: steps on ``before`` processes, the cursors through JSON (as
    in a checkpoint), then the rest of the epoch on ``after``: every row read exactly once. The parts are
    the files when their count divides the processes (4 files: 1 -> 2 -> 4 processes, or 3), else one per
    process (1 file: 2 -> 1). Would catch a resumed rank that starts its parts again (rows twice), one that
    skips the parts of the ranks that are gone (rows never read), or a refusal. ``stream_split=files``: the
    3 files are the parts over 2 processes too (unequal shares)."""
    rows = pairs(48)
    paths = [write(tmp_path / f"d{k}.jsonl", rows[k::files]) for k in range(files)]
    first = _sources(paths, before, split=split)
    assert first[0].parts == (files if files % before == 0 or split == "files" else before)
    rounds = 3 if split == "auto" else 2  # process 1 has one file of 16 rows: 2 rounds of 6 stay in its epoch 0
    read = [r.query for _ in range(rounds) for src in first for _, r in src.take(12 // before)]
    cursors = json.loads(json.dumps([src.cursor() for src in first]))
    resumed = _sources(paths, after)
    for src in resumed:
        src.seek(cursors)
    rest = [q for src in resumed for q in _epoch0(src)]
    assert len(read) == 12 * rounds and sorted(read + rest) == sorted(r["query"] for r in rows)


def test_waiting_rows_go_to_the_new_owner_of_their_part(tmp_path):
    """Rows read but held back (their positive was in the batch) are in the checkpoint with their fields and
    come first on the rank that takes their part; a checkpoint written before parts (per rank [epoch, rows
    read, waiting row numbers]) resumes the same. Would catch waiting rows lost (or read again from the
    stream) on a resume, and an upgrade that cannot read the earlier cursor."""
    f = write(tmp_path / "d.jsonl", pairs(40, dup_every=7))
    first = _sources([f], 2, buffer=8)
    for _ in range(3):
        for src in first:
            src.take(4)
    cursors = json.loads(json.dumps([src.cursor() for src in first]))
    waiting = [w for c in cursors for w in c["waiting"]]
    assert waiting, "the cut must hold waiting rows"
    one, = _sources([f], 1)
    one.seek(cursors)
    assert [r.query for _, r in one.take(len(waiting))] == [w[2]["query"] for w in waiting]
    legacy = [[e, r, [w[1] for w in c["waiting"]]] for c in cursors for (_, e, r) in c["state"]]
    assert all(e == 0 for e, _, _ in legacy)
    a, b = _sources([f], 2, buffer=8), _sources([f], 2, buffer=8)
    for x, y in zip(a, b):
        x.seek(cursors), y.seek(legacy)
        assert _drain(x, 6, 4) == _drain(y, 6, 4)
    four, = _sources([f], 4)[:1]
    with pytest.raises(ConfigError, match=r"in 2 parts .* at most 2 processes, this run has 4"):
        four.seek(cursors)


def _reads(src) -> list:
    """Counts the rows ``src`` reads from its files (before any split keeps some), in a one-item list."""
    n = [0]

    def count(row):
        n[0] += 1
        return row

    src.ds = src.ds.map(count)
    return n


def test_stream_split_files_reads_each_row_once_and_rows_reads_it_on_every_process(tmp_path, capsys):
    """3 files (16 rows each) over 2 processes: by rows (``auto`` here, as ``datasets`` splits), each process
    reads all 48 rows to keep its 24, and the start says so; with ``stream_split=files`` process 0 reads files
    0 and 2, process 1 file 1: 48 rows read in all. Both give every row to exactly one process. Would catch
    ``files`` still filtering rows (twice the reading), a split that loses or repeats rows, or a silent 2x read."""
    rows = pairs(48)
    paths = [write(tmp_path / f"d{k}.jsonl", rows[k::3]) for k in range(3)]
    for split, shares, said in (("auto", (24, 24), True), ("rows", (24, 24), True), ("files", (32, 16), False)):
        capsys.readouterr()
        srcs = _sources(paths, 2, split=split)
        assert ("note: hf:json[train]" in capsys.readouterr().out) is said
        counts = [_reads(src) for src in srcs]
        got = [[r.query for _, r in src.take(n)] for src, n in zip(srcs, shares)]
        assert sorted(got[0] + got[1]) == sorted(r["query"] for r in rows) and all(src.epoch == 0 for src in srcs)
        read = sum(c[0] for c in counts)
        assert read == 48 if split == "files" else read >= 94, (split, read)  # every other row, on both
    with pytest.raises(ConfigError, match=r"stream_split=files .* 3 file\(s\) for 4 processes"):
        _sources(paths, 4, split="files")
    with pytest.raises(ValueError, match="stream_split must be one of"):
        MixtureSource(dataset="json", data_files=[str(paths[0])], stream_split="shards")


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
    # every row bad and skipped: a whole pass finds none, which is said (it would read the stream for ever)
    bad = write(tmp_path / "b.jsonl", [{"query": "q", "pos": "a string"}] * 3)
    src = StreamingSource(spec(bad), seed=0, rank=0, world=1, shuffle_buffer=1, on_error="skip")
    with pytest.raises(ConfigError, match="a whole pass over parts \\[0\\] of 1 .* found no valid row"):
        src.take(1)
    assert sum(src.rejected.values()) == 3


def _flaky(src, fail_at, times, err=ConnectionError("Connection reset by peer")):
    """``src``'s parts read through the real `datasets` stream, raising ``err`` on reaching ``fail_at`` rows
    of an opening, ``times`` times in all (a network that drops the connection)."""
    real, left = src._part, [times]

    def part(v, epoch):
        ds = real(v, epoch)

        class Flaky:
            def __iter__(self):
                for n, row in enumerate(ds):
                    if n == fail_at and left[0] > 0:
                        left[0] -= 1
                        raise err
                    yield row
        return Flaky()

    src._part = part
    return src


def test_a_dropped_connection_is_read_again_from_where_it_stood(tmp_path, capsys):
    """A streamed source's read that fails with a network error (a reset connection, far into a run) is
    retried: the part opened again and read past the rows already read, so the batches are the ones an
    undisturbed read makes; past ``data.stream_retries`` failures in a row the run stops with one line
    (``SourceUnreachable``: status 2, the checkpoint kept). Would catch a retry that starts the part over
    (rows twice), one that skips what the buffer held, or a traceback at hour 30."""
    from qwen3train.errors import SourceUnreachable

    f = write(tmp_path / "d.jsonl", pairs(40))
    ref = _drain(StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=8), 15, 4)  # crosses epochs
    got = _drain(_flaky(StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=8, retry_wait_s=0),
                        fail_at=23, times=3), 15, 4)
    assert got == ref
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "reading it again" in ln]
    assert len(notes) == 3 and "ConnectionError: Connection reset by peer" in notes[0] and "try 3 of 5" in notes[2]
    down = _flaky(StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=8, retry_wait_s=0, retries=2),
                  fail_at=23, times=99)
    with pytest.raises(SourceUnreachable, match=r"part 0 of 1 epoch 0 after row 23: reading failed 3 times in a "
                                                r"row \(ConnectionError.*data.stream_retries=2\)"):
        _drain(down, 15, 4)


def test_a_malformed_streamed_file_is_one_line_and_an_unreachable_hub_name_too(tmp_path):
    """A line `datasets` cannot parse in a streamed JSONL (it reads blocks, so no row-wise skip) names the
    source, the part and the last row read, and the way out; not retried as a network error. A hub name
    that cannot be reached (offline here) is a config error, not a traceback."""
    rows = [json.dumps(r) for r in pairs(30)]
    rows[17] = '{"query": "q17", "pos": ["p17"'
    f = write(tmp_path / "bad.jsonl", rows)
    src = StreamingSource(spec(f), seed=0, rank=0, world=1, shuffle_buffer=1, on_error="skip", retry_wait_s=0)
    with pytest.raises(DataError, match=r"part 0 of 1 epoch 0 after row 0: field '<block>': the `datasets` reader "
                                        r"failed: ArrowInvalid: .*list it in data.train_files") as e:
        src.take(4)
    assert src._failures == 0, e.value
    with pytest.raises(ConfigError, match=r"data source hf:someone/no-such-dataset\[train\]: Couldn't reach"):
        load(MixtureSource(dataset="someone/no-such-dataset", streaming=True), streaming=True)
