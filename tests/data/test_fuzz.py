"""Nothing bad gets past the index: random corruptions of good files, where the block path and the record
parser must agree line by line, and the cases users hit, rejected before training with file:line."""

from __future__ import annotations

import json

import pytest

from qwen3train.data.fuzz import check, good_file, run
from qwen3train.data.records import DataError
from qwen3train.data.sources import IndexedSource


def test_fuzzed_files_block_path_and_parser_agree(tmp_path):
    """1,000 corrupted files (bytes flipped, removed, inserted; truncations; invalid and overlong UTF-8,
    encoded surrogates; control characters; BOMs; unpaired surrogate escapes; nesting; wrong types;
    joined lines), each of ~9 blocks with the damage mostly deep inside: the index's scan rejects exactly
    the lines the record parser rejects, accepts the rest, and on_error=raise stops at the first bad line.
    (Before: pyarrow's blocks accepted "caf\\xe9", msgspec accepted invalid bytes in unknown keys, and the
    parser accepted encoded surrogates; the first of those is what this run found.)"""
    res = run(1000, seed=20261203, workdir=tmp_path)
    assert res["disagreements"] == []
    assert res["with_rejects"] > 900  # the corruptions really break records


@pytest.mark.parametrize("bad,field", [
    (b'{"query": "caf\xe9", "pos": ["p"]}', "<utf-8>"),                 # Latin-1 / Windows-1252 byte
    (b'{"query": "q", "pos": ["\x93quoted\x94"]}', "<utf-8>"),         # Windows-1252 quotes at a string's start
    (b'{"query": "q", "pos": ["\xc0\xaf"]}', "<utf-8>"),               # overlong form
    (b'{"query": "q", "pos": ["\xed\xa0\x80"]}', "<utf-8>"),           # an encoded surrogate
    (b'{"query": "q", "pos": ["\\ud800 x"]}', "pos[0]"),               # an unpaired surrogate escape
    (b'{"query": "q\x01", "pos": ["p"]}', "<json>"),                    # a raw control character
])
def test_bad_text_is_rejected_at_index_time_by_line(tmp_path, bad, field):
    """Deep in a file larger than one scan block, before any training step: DataError naming file, line
    (never a byte offset) and field, from the index build; skip mode keeps the line in rejects.jsonl."""
    rows = [json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}).encode() for i in range(3000)]
    rows[2500] = bad
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\n".join(rows) + b"\n")
    assert f.stat().st_size > 64 * 1024
    with pytest.raises(DataError) as e:
        IndexedSource([f], index_dir=tmp_path / "ix")
    assert e.value.where == f"{f}:2501" and e.value.field == field, str(e.value)
    src = IndexedSource([f], index_dir=tmp_path / "ix2", on_error="skip", rejects_path=tmp_path / "rej.jsonl")
    assert len(src) == 2999
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and rej[0]["where"] == f"{f}:2501"


def test_check_reports_a_disagreement(tmp_path, monkeypatch):
    """The checker can fail: a scan that drops the UTF-8 test of its blocks disagrees with the parser."""
    import random

    from qwen3train.data import scan

    data = good_file(tmp_path / "g.jsonl", 40, random.Random(0)).read_bytes().replace(b'"query": "', b'"query": "\xe9', 1)
    assert check(tmp_path / "b.jsonl", data, False, 512) is None
    monkeypatch.setattr(scan, "_scan_block", lambda block, *a, _orig=scan._scan_block: _orig(
        block.decode("utf-8", errors="replace").encode(), *a))
    assert check(tmp_path / "b.jsonl", data, False, 512) is not None
