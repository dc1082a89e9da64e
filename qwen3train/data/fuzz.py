"""Random corruptions of good JSONL training files, and the check that the index's block path and the
record parser agree on every line (``tests/data/test_fuzz.py`` runs a fixed-seed subset in
``make test``; ``bench/fuzz_data.py`` runs many more and records the count).

A corrupted file is scanned by ``scan_unit`` (pyarrow blocks, then msgspec / the record parser line by
line where a block cannot decide) with small blocks, so the bad line sits deep inside a file of many
blocks; the reference is ``parse_json_line`` on each line alone. They must agree on which lines are
rejected and on how many records are accepted, and ``on_error=raise`` must stop at the first rejected
line, named by its line number.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEXTS = ["gravity pulls masses together", "café au lait", "naïve résumé", "東京は日本の首都です", "Привет, мир",
         "emoji 😀 in text", "tab\tinside", "quote \" and backslash \\", "مرحبا بالعالم", "line\u2028separator",
         "numbers 12345", "x"]
INVALID_UTF8 = [b"\xe9", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff",
                b"\xc3", b"\xf0\x9f\x98"]
OTHER_BYTES = [b"\x00", b"\x01", b"\x1f", b"\xef\xbb\xbf", b"\\ud800", b"\\udc00x", b'"', b"{", b"}", b"[", b"]",
               b",", b":", b"\\", b"\n", b" ", b"null", b"0", b"true"]


def good_file(path: Path, n: int, rng: random.Random) -> Path:
    """``n`` valid records of varied shape (escaped and raw Unicode, optional fields, negatives)."""
    with open(path, "wb") as f:
        for i in range(n):
            rec = {"query": f"{rng.choice(TEXTS)} {i}", "pos": [f"{rng.choice(TEXTS)} p{i}"]}
            if rng.random() < 0.6:
                rec["neg"] = [f"{rng.choice(TEXTS)} n{i}-{k}" for k in range(rng.randint(1, 3))]
            if rng.random() < 0.3:
                rec["task"] = rng.choice(["alpha", "beta", ""])
            if rng.random() < 0.2:
                rec["instruction"] = "Find it"
            if rng.random() < 0.1:
                rec["score"] = 0.5
            f.write(json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode("utf-8") + b"\n")
    return path


def _line_spans(data: bytes) -> list[tuple[int, int]]:
    spans, at = [], 0
    while at < len(data):
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end + 1
        spans.append((at, end))
        at = end
    return spans


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """1-3 corruptions, each inside a random line (the later half of the file more often)."""
    for _ in range(rng.randint(1, 3)):
        spans = _line_spans(data)
        if not spans:
            break
        a, b = spans[max(0, min(len(spans) - 1, int(len(spans) * rng.betavariate(2, 1.2))))]
        at = rng.randrange(a, max(a + 1, b))
        op = rng.randrange(9)
        if op == 0:  # flip a byte
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1:]
        elif op == 1:  # remove one
            data = data[:at] + data[at + 1:]
        elif op == 2:  # insert invalid UTF-8 (overlong forms, encoded surrogates, Windows-1252 bytes...)
            data = data[:at] + rng.choice(INVALID_UTF8) + data[at:]
        elif op == 3:  # insert other bytes: controls, a BOM, an unpaired surrogate escape, JSON punctuation
            data = data[:at] + rng.choice(OTHER_BYTES) + data[at:]
        elif op == 4:  # truncate the file
            data = data[:at]
        elif op == 5:  # nest: a value becomes an object or a list of lists
            data = data[:a] + data[a:b].replace(b'"pos": [', rng.choice([b'"pos": [[', b'"pos": {"a": [']), 1) + data[b:]
        elif op == 6:  # wrong types
            old, new = rng.choice([(b'"pos": [', b'"pos": '), (b'"query": "', b'"query": 7, "x": "'),
                                   (b'"neg": [', b'"neg": ["", '), (b'"task": "', b'"task": ["')])
            data = data[:a] + data[a:b].replace(old, new, 1) + data[b:]
        elif op == 7:  # two records on one line, or one record over two
            nl = data.find(b"\n", at)
            data = data[:nl] + data[nl + 1:] if nl >= 0 else data
        else:  # blank out a required field
            data = data[:a] + data[a:b].replace(b'"query": "', b'"query": " ', 1).replace(b'"query": " ', b'"query": "\\t", "z": "', 1) + data[b:]
    return data


def reference(data: bytes, require_neg: bool) -> tuple[list[int], int]:
    """(rejected line numbers, accepted count) by the record parser on each line alone."""
    from qwen3train.data.records import DataError, parse_json_line

    rejected, accepted = [], 0
    for lineno, (a, b) in enumerate(_line_spans(data), 1):
        line = data[a:b]
        if not line.strip():
            continue
        try:
            rec = parse_json_line(line, f"f:{lineno}")
            if require_neg and not rec.neg:
                raise DataError("", "neg", "no hard negatives")
            accepted += 1
        except DataError:
            rejected.append(lineno)
    return rejected, accepted


def check(path: Path, data: bytes, require_neg: bool, block_bytes: int) -> str | None:
    """None when the index's scan agrees with the reference on ``data``; else what differs."""
    from qwen3train.data.scan import scan_unit

    path.write_bytes(data)
    ref_rejected, ref_accepted = reference(data, require_neg)
    part = scan_unit(path, 0, len(data), require_neg, "skip", block_bytes=block_bytes)
    got_rejected = sorted(r["local"] for r in part.rejects)
    part._flush()
    got_accepted = sum(len(c) for c in part.chunks["offset"])
    if got_rejected != ref_rejected or got_accepted != ref_accepted:
        return f"skip: rejected {got_rejected} vs {ref_rejected}, accepted {got_accepted} vs {ref_accepted}"
    first = scan_unit(path, 0, len(data), require_neg, "raise", block_bytes=block_bytes).error
    want = ref_rejected[0] if ref_rejected else None
    if (first["local"] if first else None) != want:
        return f"raise: stopped at {first} vs line {want}"
    return None


def run(n_files: int, seed: int, workdir: Path, records: int = 120, block_bytes: int = 2048) -> dict:
    """Corrupt ``n_files`` files and check each; returns counts and the first disagreements."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    base = good_file(workdir / "good.jsonl", records, rng).read_bytes()
    out = {"files": 0, "with_rejects": 0, "disagreements": []}
    for i in range(n_files):
        data = corrupt(base, rng)
        require_neg = rng.random() < 0.25
        diff = check(workdir / "bad.jsonl", data, require_neg, block_bytes)
        out["files"] += 1
        out["with_rejects"] += bool(reference(data, require_neg)[0])
        if diff:
            (workdir / f"disagreement_{i}.jsonl").write_bytes(data)
            out["disagreements"].append({"file": i, "require_neg": require_neg, "diff": diff})
    return out
