"""The shared record index: built once, reused by restarts and ranks, rebuilt when the data or the
validation settings change, cut into units whose join equals a one-unit scan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import crash_report
from qwen3train.data import index, scan
from qwen3train.data.records import DataError
from qwen3train.data.sources import IndexedSource

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1"]}


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def rows(n, bad_every=0):
    out = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            out.append("not json" if i % 2 else {"query": f"q{i}", "pos": "a string"})
        else:
            out.append({"query": f"q{i}", "pos": [f"p{i}", f"p{i}b"][: 1 + i % 2], "task": "ab"[i % 2]})
    return out


def dump(src):
    ids = np.arange(len(src))
    return (len(src), src.task_names, src.task_idx.tolist(), src.num_pos_of(ids).tolist(),
            src.positive_hashes(ids, np.zeros(len(src), np.int64)).tolist(), [src[i].query for i in ids])


def test_restart_reads_no_record(tmp_path, monkeypatch):
    """A second open memory-maps the index: scanning again (the 19-minute restart at 150M records) fails."""
    f = write(tmp_path / "d.jsonl", rows(50))
    first = IndexedSource([f], index_dir=tmp_path / "ix")
    assert first.index_stats["built"] == [str(f)]
    monkeypatch.setattr(index, "scan_unit", lambda *a, **k: pytest.fail("rescanned on restart"))
    again = IndexedSource([f], index_dir=tmp_path / "ix")
    assert again.index_stats["built"] == [] and dump(again) == dump(first)
    assert isinstance(again.files[0].offset, np.memmap)  # mapped, not loaded into this process


def test_changed_file_or_settings_get_a_new_index(tmp_path):
    f = write(tmp_path / "d.jsonl", rows(20))
    assert len(IndexedSource([f], index_dir=tmp_path / "ix")) == 20
    with open(f, "a") as h:
        h.write(json.dumps({"query": "new", "pos": ["x"]}) + "\n")
    src = IndexedSource([f], index_dir=tmp_path / "ix")
    assert len(src) == 21 and src[20].query == "new" and src.index_stats["built"]
    # an index built in skip mode (bad records left out) is never used to train in raise mode
    g = write(tmp_path / "g.jsonl", rows(12, bad_every=4))
    assert len(IndexedSource([g], on_error="skip", index_dir=tmp_path / "ix")) == 9
    with pytest.raises(DataError, match=r"g.jsonl:4: field '<json>'"):
        IndexedSource([g], index_dir=tmp_path / "ix")
    # nor an index without negatives checked for a stage that needs them
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'neg'"):
        IndexedSource([f], num_hard_negatives=1, index_dir=tmp_path / "ix")


def test_units_join_to_the_one_unit_index_with_global_line_numbers(tmp_path):
    """Cut into ~10 units (byte ranges at line starts): same records, tasks, hashes; rejects and the
    first error carry the line in the whole file, not in the unit."""
    f = write(tmp_path / "d.jsonl", rows(60, bad_every=7) + ["", json.dumps(GOOD)])
    one = IndexedSource([f], on_error="skip", rejects_path=tmp_path / "r1.jsonl", index_dir=tmp_path / "a")
    cut = IndexedSource([f], on_error="skip", rejects_path=tmp_path / "r2.jsonl", index_dir=tmp_path / "b",
                        unit_bytes=200)
    assert len(index.units(f, 200)) >= 10
    assert dump(cut) == dump(one) and cut.rejected == one.rejected and sum(one.rejected.values()) == 8
    rej = [json.loads(x)["where"] for x in (tmp_path / "r2.jsonl").read_text().splitlines()]
    assert rej == [f"{f}:{n}" for n in range(7, 61, 7)]
    assert (tmp_path / "r1.jsonl").read_bytes() == (tmp_path / "r2.jsonl").read_bytes()
    with pytest.raises(DataError) as err:
        IndexedSource([f], index_dir=tmp_path / "c", unit_bytes=200)
    assert err.value.where == f"{f}:7"


def test_interrupted_build_is_ignored_and_rebuilt(tmp_path):
    f = write(tmp_path / "d.jsonl", rows(10))
    key = index.file_key(f, False, "raise")
    stale = tmp_path / "ix" / f"{key}.build-dead" / "part-000000"
    stale.mkdir(parents=True)
    (stale / "part.json").write_text("{truncated")
    half = tmp_path / "ix" / key  # a folder without meta.json: never published
    half.mkdir()
    src = IndexedSource([f], index_dir=tmp_path / "ix")
    assert len(src) == 10 and src.index_stats["built"]


def test_arrow_sources_are_indexed_by_row(tmp_path):
    import datasets

    recs = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"], "task": "t"} for i in range(7)]
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "d.parquet"))
    src = IndexedSource([tmp_path / "d.parquet"], num_hard_negatives=1, index_dir=tmp_path / "ix")
    assert [src[i].query for i in range(7)] == [r["query"] for r in recs]
    assert [u for u in index.units(tmp_path / "d.parquet", unit_rows=3)] == [(0, 3), (3, 6), (6, 7)]


@pytest.mark.slow
def test_two_ranks_build_one_index_and_write_rejects_once(tmp_path):
    """2 gloo processes share the units of one file; the index and the rejects equal a 1-process build."""
    f = write(tmp_path / "d.jsonl", rows(80, bad_every=9))
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).with_name("index_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(f), str(tmp_path / "ix"), str(out), "300"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, crash_report(proc)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    one = IndexedSource([f], on_error="skip", rejects_path=tmp_path / "r1.jsonl", index_dir=tmp_path / "solo",
                        unit_bytes=300)
    for r in (r0, r1):
        assert (r["n"], r["tasks"], r["task_idx"], r["queries"]) == (len(one), one.task_names, one.task_idx.tolist(),
                                                                      [one[i].query for i in range(len(one))])
        assert r["rejected"] == dict(one.rejected)
    assert r0["scanned"] > 0 and r1["scanned"] > 0  # both ranks scanned units of the one file
    assert (out / "rejects.jsonl").read_bytes() == (tmp_path / "r1.jsonl").read_bytes()
    assert len([p for p in (tmp_path / "ix").iterdir()]) == 1  # one published index, no leftovers


LINES = [
    {"query": "q", "pos": ["p"]}, {"query": "q", "pos": ["p", "p2"], "neg": ["n"], "task": "t", "type": "symmetric"},
    {"query": "q", "pos": ["p"], "task": ""}, {"query": "q", "pos": ["p"], "task": None, "neg": None},
    {"query": "q", "pos": ["p"], "prompt": "flag", "extra": {"score": 1}}, {"query": " ", "pos": ["p"]},
    {"query": "q", "pos": []}, {"query": "q", "pos": "p"}, {"query": "q", "pos": ["p", " "]},
    {"query": "q", "pos": ["p"], "neg": ["  "]}, {"query": "q", "pos": ["p"], "task": 3}, {"pos": ["p"]},
    {"query": 1, "pos": ["p"]}, {"query": "q", "pos": ["p"], "instruction": ["x"]}, [1, 2], "just a string",
    '{"query": "q", "pos": ["p"]', '{"query": "q\\u2028", "pos": ["\\u00e9"]}', '\xff\xfe',
    # documents never to be negatives: a list of non-blank strings like neg (a string, a blank or a null item is
    # refused by the record parser, so the index must refuse it too, not let it fail at the batch that reads it)
    {"query": "q", "pos": ["p"], "not_neg": ["partly relevant"]}, {"query": "q", "pos": ["p"], "not_neg": "x"},
    {"query": "q", "pos": ["p"], "not_neg": [" "]}, {"query": "q", "pos": ["p"], "not_neg": [None]},
    {"query": "q", "pos": ["p"], "not_neg": [3]},
]


def test_fast_path_accepts_exactly_what_the_record_parser_accepts():
    """The index validates with a typed msgspec decode; anything it accepts must parse the same way
    with the full parser (task, positives, negatives present), and anything the full parser rejects
    must not be accepted by it (it would enter training unchecked)."""
    from qwen3train.data.records import fast_line_parser, parse_json_line

    fast = fast_line_parser()
    assert fast is not None  # msgspec is a dependency
    accepted = 0
    for row in LINES:
        line = (row if isinstance(row, str) else json.dumps(row)).encode("utf-8", errors="surrogateescape")
        try:
            rec = parse_json_line(line, "x")
        except DataError:
            rec = None
        hit = fast(line)
        if hit is not None:
            accepted += 1
            assert rec is not None and hit == (rec.task, rec.pos, bool(rec.neg)), row
    assert accepted == 7  # the fast path is used for the ordinary good records, not only avoided


EXTRA = ["", "   ", "null", '{"query": "q", "pos": ["p"]} {"query": "r", "pos": ["s"]}', '{"query": "\\ud800", "pos": ["p"]}',
         '{"query": "q", "pos": [null]}', '{"query": "q", "pos": ["p"], "x": NaN}', '{"query": "q", "pos": ["p"], "x": 1e999}',
         '{"query": "\\u3000\\u2028", "pos": ["p"]}', '{"query": "\\u001c", "pos": ["p"]}', '{"query": "q", "pos": ["p"], "neg": []}',
         '{"query": "q", "query": "r", "pos": ["p"]}', '  {"query": "q", "pos": ["p"]}', '{"query": "q", "pos": ["p"]}\r',
         '{"query": "x\\u00a0", "pos": ["\\u0085"]}'] + [
    '{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.5], "neg_scores": [-2]}',  # good: a teacher's
    '{"query": "q", "pos": ["p", "p2"], "pos_scores": [1.0]}', '{"query": "q", "pos": ["p"], "neg_scores": [0.1]}',
    '{"query": "q", "pos": ["p"], "pos_scores": [1e999]}', '{"query": "q", "pos": ["p"], "pos_scores": [NaN]}',
    '{"query": "q", "pos": ["p"], "pos_scores": [true]}', '{"query": "q", "pos": ["p"], "pos_scores": null}',
    '{"query": "q", "pos": ["p"], "pos_scores": ["1"]}', '{"query": "q", "pos": ["p"], "pos_scores": [null]}',
    '{"query": "q", "pos": ["p"], "pos_scores": 1.0}']
SCORED = EXTRA[-10:]


def test_teacher_scores_are_checked_alike_by_every_path():
    """One finite score per positive / negative, or none: the fast line parser accepts only what the record
    parser accepts (a score list of the wrong length, inf, NaN, a boolean would enter training unchecked)."""
    from qwen3train.data.records import fast_line_parser, parse_json_line

    fast, good = fast_line_parser(), []
    for line in SCORED:
        try:
            rec = parse_json_line(line, "x")
            good.append(line)
        except DataError:
            rec = None
        hit = fast(line.encode())
        assert hit is None or (rec is not None and hit == (rec.task, rec.pos, bool(rec.neg))), line
    assert good == [SCORED[0], SCORED[6]]
    rec = parse_json_line(SCORED[0], "x")
    assert (rec.pos_scores, rec.neg_scores, rec.has_teacher) == ([1.5], [-2.0], True)
    with pytest.raises(DataError, match=r"x: field 'pos_scores': 1 scores for 2 pos texts: one score per text"):
        parse_json_line(SCORED[1], "x")


def _both_paths(f, monkeypatch, **kw):
    """scan_unit over the whole file with the vectorised block path (small blocks) and without it."""
    used = []
    real = scan._scan_block

    def spy(*a, **k):
        used.append(real(*a, **k))
        return used[-1]

    monkeypatch.setattr(scan, "_scan_block", spy)
    size = f.stat().st_size
    fast = scan.scan_unit(f, 0, size, block_bytes=120, **kw)
    monkeypatch.setattr(scan, "_scan_block", lambda *a, **k: False)
    slow = scan.scan_unit(f, 0, size, **kw)
    for p in (fast, slow):
        p._flush()
    arrays = [{k: np.concatenate(p.chunks[k]).tolist() if p.chunks[k] else [] for k in p.FIELDS} for p in (fast, slow)]
    tasks = [[list(p.tasks)[i] for i in a["task"]] for p, a in zip((fast, slow), arrays)]
    return used, (arrays[0] | {"task": tasks[0]}, fast.rejects, fast.error), (arrays[1] | {"task": tasks[1]}, slow.rejects, slow.error)


@pytest.mark.parametrize("require_neg", [False, True])
def test_block_path_equals_the_line_by_line_scan(tmp_path, monkeypatch, require_neg):
    """pyarrow's JSON reader + array checks (the fast path of a first build) give the records, tasks,
    positive hashes, rejects (with their lines) and first error of the record parser line by line:
    each odd line (bad records, blank lines, two objects on a line, lone surrogates, null elements,
    Unicode spaces, CRLF) sits between good ones. Would catch the block path accepting a record the
    parser rejects, shifting a line number, or hashing a different text."""
    lines = []
    for k, odd in enumerate(LINES + EXTRA):
        lines += [json.dumps({"query": f"good {k}", "pos": [f"p{k}", f"p{k} é"], "neg": ["n"], "task": "ab"[k % 2]}),
                  odd if isinstance(odd, str) else json.dumps(odd)]
    f = tmp_path / "d.jsonl"
    f.write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))
    used, fast, slow = _both_paths(f, monkeypatch, require_neg=require_neg, on_error="skip")
    assert fast == slow
    assert sum(used) >= 10 and not all(used)  # blocks of both kinds were exercised
    assert len(fast[1]) >= 15  # the bad records were rejected, not silently dropped
    _, fast, slow = _both_paths(f, monkeypatch, require_neg=require_neg, on_error="raise")
    assert fast[2] == slow[2] is not None


def test_block_path_on_a_clean_file_keeps_every_record(tmp_path, monkeypatch):
    f = write(tmp_path / "d.jsonl", rows(300))
    used, fast, slow = _both_paths(f, monkeypatch, require_neg=False, on_error="raise")
    assert all(used) and fast == slow and len(fast[0]["offset"]) == 300 and fast[1] == []


def test_arrow_whitespace_is_python_whitespace():
    """The block path finds blank strings with Arrow's utf8_is_space; the record parser uses str.strip.
    They must agree on every code point, or the block path would accept a query the parser rejects."""
    import sys

    import pyarrow as pa
    import pyarrow.compute as pc

    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000]
    arrow = pc.utf8_is_space(pa.array(chars)).to_numpy(zero_copy_only=False)
    assert [c for c, a in zip(chars, arrow) if bool(a) != c.isspace()] == []


def test_doc_hash_of_arrow_buffers_equals_doc_hash_of_the_text():
    import pyarrow as pa

    from qwen3train.data.records import doc_hash

    texts = ["a", "", "é\u2028x", "text " * 50]
    arr = pa.array(["skip"] + texts).slice(1)  # a sliced array: offsets do not start at 0
    assert scan._hash_strings(arr).tolist() == [doc_hash(t) for t in texts]
    assert len({doc_hash(t) for t in texts}) == 4


def _rewrite_in_place(path, data: bytes) -> None:
    """Another job writing over the file (``open(..., "r+b")``: the same inode, as ``cp`` or ``>`` does)."""
    st = path.stat()
    with open(path, "r+b") as h:
        h.write(data)
        h.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later time, even on a coarse clock


def test_a_file_rewritten_under_a_running_job_is_named_not_misread(tmp_path):
    """A JSONL file rewritten in place while a run reads it: the index's offsets now point into other text.
    Fails if a read returns a record that was never at that index (silently other data), or if a record cut in
    half is blamed on the data ("not valid JSON") instead of the change."""
    f = write(tmp_path / "d.jsonl", rows(40))
    src = IndexedSource([f], index_dir=tmp_path / "ix")
    assert [r.query for r in src.records(range(5))] == [f"q{i}" for i in range(5)]
    lines = f.read_bytes().splitlines(keepends=True)
    _rewrite_in_place(f, b"".join(lines[::-1]))  # the same bytes, the same size, in another order
    with pytest.raises(DataError, match=r"d.jsonl: field '<file>': changed while this run reads it \(.* bytes, "
                                        r"modified .* when indexed, now .*\): its index no longer locates"):
        src.records([5, 6])
    g = write(tmp_path / "g.jsonl", rows(400))  # past the read buffer (8 KiB) of the open handle
    src = IndexedSource([g], index_dir=tmp_path / "ix")
    assert src[0].query == "q0"  # the handle is open
    _rewrite_in_place(g, b"".join(g.read_bytes().splitlines(keepends=True)[:20]))  # cut short
    with pytest.raises(DataError, match="g.jsonl: field '<file>': changed while this run reads it"):
        src[300]  # one read alone (no batch check after it): the failed parse names the change


def test_a_file_replaced_by_a_rename_keeps_being_read_as_indexed(tmp_path):
    """A new version moved over the path (write elsewhere, rename: what our own writers do): the open handle
    keeps the indexed file, so the run reads exactly what it indexed; no error."""
    f = write(tmp_path / "d.jsonl", rows(40))
    src = IndexedSource([f], index_dir=tmp_path / "ix")
    assert src.records([0])[0].query == "q0"  # the handle is open
    write(tmp_path / "new.jsonl", [{"query": f"other {i}", "pos": ["x"]} for i in range(40)]).replace(f)
    assert [r.query for r in src.records(range(40))] == [f"q{i}" for i in range(40)]


def test_a_json_array_is_named_as_one_not_as_invalid_json(tmp_path):
    """A training file written by json.dump (or to_json(lines=False)): one JSON array, pretty-printed or on one
    line. It was "field '<json>': not valid JSON (Expecting value at column 1)" (pretty) or "must be a JSON object,
    got list" (one line), though the file is valid JSON; now it says what it is and how to convert it. Every JSON
    Lines reader says the same (a stage-0 corpus here)."""
    from qwen3train.data.jsonl import iter_json_lines
    from qwen3train.data.records import ARRAY_HINT

    recs = [{"query": f"q{i}", "pos": [f"p{i}"]} for i in range(4)]
    for name, text in (("pretty.json", json.dumps(recs, indent=2)), ("compact.json", json.dumps(recs))):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as e:
            IndexedSource([str(tmp_path / name)], index_dir=tmp_path / "ix")
        assert str(e.value) == f"{tmp_path / name}:1: field '<json>': {ARRAY_HINT}"
        with pytest.raises(DataError, match="a JSON array, not JSON Lines"):
            list(iter_json_lines(tmp_path / name))
    # a broken JSON Lines file stays what it was; a JSON Lines row that is a list is not a record
    (tmp_path / "broken.jsonl").write_text('{"query": "q", "pos": ["p"]}\n{"query": oops}\n["q", ["p"]]\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: field '<json>': not valid JSON \(Expecting value"):
        IndexedSource([str(tmp_path / "broken.jsonl")], index_dir=tmp_path / "ix")
    (tmp_path / "listrow.jsonl").write_text('{"query": "q", "pos": ["p"]}\n["q", ["p"]]\n')
    with pytest.raises(DataError, match=r"listrow.jsonl:2: field '<record>': must be a JSON object, got list"):
        IndexedSource([str(tmp_path / "listrow.jsonl")], index_dir=tmp_path / "ix")
