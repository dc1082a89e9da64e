"""Scanning one unit of a data file for the record index (``data/index.py``): validate its records and
collect, per record, its offset (or row), task and the hashes of its positives, with rejects and the
first error.

Two paths that accept exactly the same records (tests/data/test_index.py): blocks of lines parsed by
pyarrow's JSON reader and checked as arrays (the fast path of a first build), and the record parser line
by line (msgspec's typed decode first), which decides everything the block path cannot and names each
error's file, line and field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen3train.data.formats import to_ours
from qwen3train.data.hf import DatasetRef
from qwen3train.data.records import DataError, doc_hash, fast_line_parser, parse_json_line, parse_record


def kind(path) -> str:
    if isinstance(path, DatasetRef):
        return "arrow_ref"
    if path.is_dir():
        return "hf_disk"
    if path.suffix == ".parquet":
        return "parquet"
    return "jsonl"


def _arrow(path):
    if isinstance(path, DatasetRef):
        return path.dataset
    import datasets

    if kind(path) == "hf_disk":
        return datasets.load_from_disk(str(path))
    return datasets.Dataset.from_parquet(str(path))


# ---- scanning one unit -----------------------------------------------------------------------
class _Part:
    """The arrays of one unit while it is scanned, with its rejects and first error. Records come one by
    one (``add``, the line-by-line path) or a block at a time (``add_many``, the vectorised path), in
    line order either way."""

    FIELDS = ("offset", "task", "pos_count", "pos_hash")
    DTYPES = {"offset": np.int64, "task": np.int32, "pos_count": np.int64, "pos_hash": np.int64}

    def __init__(self) -> None:
        self.chunks: dict[str, list[np.ndarray]] = {k: [] for k in self.FIELDS}
        self.rows: dict[str, list[int]] = {k: [] for k in self.FIELDS}
        self.tasks: dict[str, int] = {}
        self.rejects: list[dict] = []
        self.error: dict | None = None
        self.lines = 0
        self.content = None  # XXH3-128 of the unit's bytes (JSONL) or rows (Arrow): what the index was built from

    def add(self, off: int, task: str, pos: list[str]) -> None:
        self.rows["offset"].append(off)
        self.rows["task"].append(self.tasks.setdefault(task, len(self.tasks)))
        self.rows["pos_count"].append(len(pos))
        self.rows["pos_hash"].extend(doc_hash(p) for p in pos)

    def add_many(self, offset: np.ndarray, task_names: list[str], task_idx: np.ndarray, pos_count: np.ndarray,
                 pos_hash: np.ndarray) -> None:
        """Records of a block: ``task_idx`` indexes ``task_names``."""
        self._flush()
        remap = np.asarray([self.tasks.setdefault(t, len(self.tasks)) for t in task_names] or [0], dtype=np.int32)
        for k, v in (("offset", offset), ("task", remap[task_idx]), ("pos_count", pos_count), ("pos_hash", pos_hash)):
            self.chunks[k].append(np.asarray(v, dtype=self.DTYPES[k]))

    def _flush(self) -> None:
        if self.rows["offset"] or self.rows["pos_hash"]:
            for k in self.FIELDS:
                self.chunks[k].append(np.asarray(self.rows[k], dtype=self.DTYPES[k]))
                self.rows[k] = []

    def save(self, folder: Path) -> None:
        self._flush()
        folder.mkdir(parents=True, exist_ok=True)
        for k in self.FIELDS:
            np.save(folder / f"{k}.npy", np.concatenate(self.chunks[k]) if self.chunks[k]
                    else np.zeros(0, dtype=self.DTYPES[k]))
        meta = {"tasks": list(self.tasks), "lines": self.lines, "error": self.error, "rejects": self.rejects,
                "content": self.content.hexdigest() if self.content is not None else None}
        (folder / "part.json").write_text(json.dumps(meta, ensure_ascii=False, default=str))


def _check(parse, require_neg: bool) -> tuple[object | None, DataError | None]:
    """(record, None) when the slow parser accepts, else (None, the error it names)."""
    try:
        rec = parse()
        if require_neg and not rec.neg:
            raise DataError("", "neg", "no hard negatives, but data.num_hard_negatives > 0")
    except DataError as e:
        return None, e
    return rec, None


def _reject(part: _Part, local: int, e: DataError, raw, on_error: str) -> bool:
    """Record a bad record; False when the scan must stop (``raise``)."""
    if on_error == "raise":
        part.error = {"local": local, "field": e.field, "reason": e.reason}
        return False
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace").rstrip("\n")
    part.rejects.append({"local": local, "field": e.field, "error": e.reason, "raw": raw})
    return True


# The vectorised path: pyarrow's JSON reader (C++) parses a block of lines into typed columns and the
# checks of ``parse_record`` run as array operations. It only ever accepts what ``parse_record``
# accepts (tests/data/test_index.py runs both over good and bad records): anything it cannot decide
# (a line that is not one object, a type it did not expect, a row that fails a check) goes to the
# line-by-line path, which accepts it the same way or names the precise error.
BLOCK_BYTES = 8 << 20
_OPTIONAL_STR = ("task", "instruction", "prompt", "type")


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([("query", pa.string())] + [(k, pa.list_(pa.string())) for k in ("pos", "neg", "not_neg")]
                     + [(k, pa.string()) for k in _OPTIONAL_STR]
                     + [(k, pa.list_(pa.float64())) for k in ("pos_scores", "neg_scores")])


def _scores_ok(scores, length: np.ndarray) -> np.ndarray:
    """Per row: no scores, or one finite score per text (``records._scores``)."""
    import pyarrow.compute as pc

    have = pc.is_valid(scores).to_numpy(zero_copy_only=False)
    count = pc.fill_null(pc.list_value_length(scores), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    ok = ~have | (count == length)
    flat = scores.flatten()
    if len(flat):
        bad = ~pc.fill_null(pc.is_finite(flat), False).to_numpy(zero_copy_only=False)
        ok[pc.list_parent_indices(scores).to_numpy(zero_copy_only=False)[bad]] = False
    return ok


def _blank(strings) -> np.ndarray:
    """Per string: missing, empty or whitespace only (Arrow's ``utf8_is_space`` = ``str.isspace``, tested)."""
    import pyarrow.compute as pc

    blank = pc.or_(pc.utf8_is_space(strings), pc.equal(pc.binary_length(strings), 0))
    return pc.fill_null(blank, True).to_numpy(zero_copy_only=False)


def _list_ok(lists, n: int, required: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row passes, list length) for a list<string> column: present (if required), not empty (if
    required), no missing or blank element."""
    import pyarrow.compute as pc

    length = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    ok = (length > 0) if required else np.ones(n, dtype=bool)
    flat = lists.flatten()
    if len(flat):
        parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        ok[parent[_blank(flat)]] = False
    return ok, length


def _hash_strings(flat) -> np.ndarray:
    """``doc_hash`` of every string of a (non-null) string array, from Arrow's buffers (no str objects)."""
    from xxhash import xxh3_64_intdigest

    offsets = np.frombuffer(flat.buffers()[1], dtype=np.int32)[flat.offset:flat.offset + len(flat) + 1]
    data = flat.buffers()[2]
    mv = memoryview(data) if data is not None else memoryview(b"")
    bounds = offsets.tolist()
    out = np.fromiter((xxh3_64_intdigest(mv[a:b]) for a, b in zip(bounds, bounds[1:])), dtype=np.uint64,
                      count=len(flat))
    return out.view(np.int64)


def _scan_block(block: bytes, base: int, line0: int, part: _Part, require_neg: bool, on_error: str) -> bool:
    """Validate a block of whole lines (``base``: its byte offset in the file, ``line0``: lines before it in
    the unit) and add its records to ``part``. False when nothing was added and the block needs the
    line-by-line path. Counts the block's lines into ``part.lines`` when it returns True."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    try:  # pyarrow lets some invalid UTF-8 through (and fails on other bytes outside its parse): the line
        block.decode("utf-8")  # path decides and names such lines
    except UnicodeDecodeError:
        return False
    buf = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [len(block)]))
    if starts[-1] == len(block):  # the block ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    filled = ends > starts
    first = buf[starts[filled]]
    if len(first) == 0 or not (first == ord("{")).all():  # blank-looking or non-object lines: decided line by line
        return False
    try:
        table = pj.read_json(pa.BufferReader(block), read_options=pj.ReadOptions(use_threads=False,
                                                                                  block_size=max(len(block) + 1, 1 << 20)),
                             parse_options=pj.ParseOptions(explicit_schema=_arrow_schema(),
                                                           unexpected_field_behavior="ignore"))
    except (pa.ArrowException, UnicodeDecodeError, ValueError):
        return False
    lines_at = np.flatnonzero(filled)  # row i is the block's line lines_at[i]
    n = table.num_rows
    if n != len(lines_at):  # e.g. two objects on one line
        return False
    table = table.combine_chunks()
    ok = ~_blank(table.column("query").chunk(0))
    pos = table.column("pos").chunk(0)
    pos_ok, pos_count = _list_ok(pos, n, required=True)
    neg_ok, neg_count = _list_ok(table.column("neg").chunk(0), n, required=False)
    ok &= pos_ok & neg_ok & _list_ok(table.column("not_neg").chunk(0), n, required=False)[0]
    ok &= _scores_ok(table.column("pos_scores").chunk(0), pos_count)
    ok &= _scores_ok(table.column("neg_scores").chunk(0), neg_count)
    if require_neg:
        ok &= neg_count > 0
    bad = np.flatnonzero(~ok)
    stop = n
    errors = []
    for i in bad:  # rare: the slow parser names the error (or accepts: then the whole block goes slow)
        line = bytes(block[starts[lines_at[i]]:ends[lines_at[i]] + 1])
        rec, err = _check(lambda: parse_json_line(line, ""), require_neg)
        if err is None:
            return False
        errors.append((int(i), err, line))
    if errors and on_error == "raise":
        stop = errors[0][0]
    keep = np.flatnonzero(ok[:stop])
    task = pc.fill_null(table.column("task").chunk(0), "default").dictionary_encode()
    task_idx = task.indices.to_numpy(zero_copy_only=False)[keep]
    flat = pos.flatten()
    parent = pc.list_parent_indices(pos).to_numpy(zero_copy_only=False)
    keep_mask = np.zeros(n, dtype=bool)
    keep_mask[keep] = True
    hashes = _hash_strings(flat)[keep_mask[parent]] if len(flat) else np.zeros(0, dtype=np.int64)
    names = [t or "default" for t in task.dictionary.to_pylist()]  # as parse_record: "" and null are "default"
    part.add_many(base + starts[lines_at[keep]], names, task_idx, pos_count[keep], hashes)
    for i, err, line in errors:
        if not _reject(part, line0 + int(lines_at[i]) + 1, err, line, on_error):
            part.lines = line0 + int(lines_at[i]) + 1
            return True
    part.lines = line0 + len(starts)
    return True


def _blocks(data: bytes, size: int):
    """(start, end) of blocks of whole lines of about ``size`` bytes."""
    at = 0
    while at < len(data):
        end = len(data)
        if at + size < len(data):
            cut = data.find(b"\n", at + size - 1)
            if cut >= 0:
                end = cut + 1
        yield at, end
        at = end


def scan_unit(path: Path, start: int, end: int, require_neg: bool, on_error: str,
              block_bytes: int = BLOCK_BYTES) -> _Part:
    """Validate the records of one unit. Line numbers (``where``) are local to the unit until the join."""
    part = _Part()

    def take(off: int, local: int, parse, raw) -> bool:
        rec, err = _check(parse, require_neg)
        if err is not None:
            return _reject(part, local, err, raw, on_error)
        part.add(off, rec.task, rec.pos)
        return True

    from xxhash import xxh3_128

    part.content = xxh3_128()
    if kind(path) == "jsonl":
        fast = fast_line_parser()
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        part.content.update(data)  # ~10 GB/s: what the index offsets point into, every byte of it
        for b0, b1 in _blocks(data, block_bytes):
            block = data[b0:b1]
            if _scan_block(block, start + b0, part.lines, part, require_neg, on_error):
                if part.error:
                    break
                continue
            pos = 0
            for line in _lf_lines(block):
                part.lines += 1
                off, pos = start + b0 + pos, pos + len(line)
                if not line.strip():
                    continue
                hit = fast(line) if fast is not None else None
                if hit is not None and (hit[2] or not require_neg):  # valid: no Record built
                    part.add(off, hit[0], hit[1])
                elif not take(off, part.lines, lambda: parse_json_line(line, ""), line):
                    break
            if part.error:
                break
    else:
        ds, mapping = _arrow(path), getattr(path, "mapping", None)  # another tool's format: read as ours
        for row in range(start, end):
            part.lines += 1
            obj = ds[row]
            part.content.update(json.dumps(obj, ensure_ascii=False, default=str).encode())
            if not take(row, part.lines, lambda: parse_record(to_ours(obj, mapping, ""), ""), obj):
                break
    return part


def _lf_lines(block: bytes) -> list[bytes]:
    """Lines split on b"\\n" only, with their newline (texts may hold other line breaks)."""
    out = block.split(b"\n")
    lines = [x + b"\n" for x in out[:-1]]
    if out[-1]:
        lines.append(out[-1])
    return lines
