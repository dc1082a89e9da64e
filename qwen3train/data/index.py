"""The on-disk record index: built once per data file, shared by every rank and every restart.

Training needs, per record, where it lives (byte offset in a JSONL file, row of an Arrow table), its
task and the hashes of its positives (duplicate control in batch plans). Scanning and validating costs
~2.2 us per record and process even on the fast path (pyarrow's JSON reader over blocks of lines, the
record checks as array operations; 150M records on 8 ranks: ~40 s), so it is done once:

* **Key**: the file's resolved path, size and modification time (every file of a dataset folder),
  the validation settings (negatives required or not, raise or skip) and the index format version.
  A changed file or setting gets a new index; an old one is never read for the wrong data.
* **Build**: the files are cut into units (64 MiB byte ranges aligned to line starts; 1M rows of an
  Arrow table), the ranks scan units round robin, each unit written as its own part; rank 0 then joins
  the parts in order into one index per file (task ids remapped, line numbers made global, rejects
  written once) and publishes it by renaming its folder into place. A crash mid-build leaves only a
  ``*.build-*`` folder that the next start ignores and rebuilds.
* **Use**: every rank memory-maps the arrays (``numpy.load(mmap_mode="r")``): the index lives once
  in the page cache of a node, whatever the number of ranks, and a restart reads no record.

Layout of ``<index_dir>/<key>/``: ``offset.npy`` (int64, byte offset or row), ``task.npy`` (int32,
ids into ``meta.json``'s ``tasks``), ``pos_ptr.npy`` (int64, n + 1: the positives of record i are
``pos_hash[pos_ptr[i]:pos_ptr[i + 1]]``), ``pos_hash.npy`` (int64), ``rejects.jsonl`` (skip mode),
``meta.json`` (written last).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3train.data.hf import DatasetRef
from qwen3train.data.records import DataError, doc_hash, fast_line_parser, parse_json_line, parse_record
from qwen3train.errors import ConfigError

INDEX_VERSION = 2  # 2: positives hashed with records.doc_hash (XXH3)
UNIT_BYTES = 64 << 20
UNIT_ROWS = 1 << 20


def default_index_dir() -> Path:
    """``$QWEN3TRAIN_INDEX_DIR``, else ``$QWEN3TRAIN_CACHE/index``, else ``~/.cache/qwen3train/index``."""
    if os.environ.get("QWEN3TRAIN_INDEX_DIR"):
        return Path(os.environ["QWEN3TRAIN_INDEX_DIR"])
    return Path(os.environ.get("QWEN3TRAIN_CACHE", Path.home() / ".cache" / "qwen3train")) / "index"


def kind(path) -> str:
    if isinstance(path, DatasetRef):
        return "arrow_ref"
    if path.is_dir():
        return "hf_disk"
    if path.suffix == ".parquet":
        return "parquet"
    return "jsonl"


def file_key(path: Path, require_neg: bool, on_error: str) -> str:
    """Identity of (data, validation settings): changes whenever either does."""
    if isinstance(path, DatasetRef):  # load_dataset's Arrow cache: its fingerprint names its content
        real, state = path.name, [path.fingerprint]
    else:
        real, state = _file_state(path)
    blob = json.dumps({"v": INDEX_VERSION, "path": str(real), "state": state, "require_neg": require_neg,
                       "on_error": on_error})
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def _file_state(path: Path):
    real = Path(os.path.realpath(path))
    if real.is_dir():
        files = sorted(p for p in real.rglob("*") if p.is_file())
        state = [(str(p.relative_to(real)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    else:
        st = real.stat()
        state = [(st.st_size, st.st_mtime_ns)]
    return real, state


# ---- units -----------------------------------------------------------------------------------
def _arrow(path):
    if isinstance(path, DatasetRef):
        return path.dataset
    import datasets

    if kind(path) == "hf_disk":
        return datasets.load_from_disk(str(path))
    return datasets.Dataset.from_parquet(str(path))


def units(path: Path, unit_bytes: int = UNIT_BYTES, unit_rows: int = UNIT_ROWS) -> list[tuple[int, int]]:
    """[start, end) ranges covering the file: byte ranges that start at a line start (JSONL), or row ranges."""
    if kind(path) != "jsonl":
        n = len(_arrow(path))
        return [(s, min(s + unit_rows, n)) for s in range(0, n, unit_rows)] or [(0, 0)]
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + unit_bytes < size:
            f.seek(cuts[-1] + unit_bytes)
            f.readline()  # to the start of the next line
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


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
        meta = {"tasks": list(self.tasks), "lines": self.lines, "error": self.error, "rejects": self.rejects}
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

    return pa.schema([("query", pa.string()), ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string()))]
                     + [(k, pa.string()) for k in _OPTIONAL_STR])


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
    ok &= pos_ok & neg_ok
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

    if kind(path) == "jsonl":
        fast = fast_line_parser()
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
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
        ds = _arrow(path)
        for row in range(start, end):
            part.lines += 1
            obj = ds[row]
            if not take(row, part.lines, lambda: parse_record(obj, ""), obj):
                break
    return part


def _lf_lines(block: bytes) -> list[bytes]:
    """Lines split on b"\\n" only, with their newline (texts may hold other line breaks)."""
    out = block.split(b"\n")
    lines = [x + b"\n" for x in out[:-1]]
    if out[-1]:
        lines.append(out[-1])
    return lines


# ---- the index of one file -------------------------------------------------------------------
@dataclass
class FileIndex:
    path: Path
    offset: np.ndarray
    task: np.ndarray
    pos_ptr: np.ndarray
    pos_hash: np.ndarray
    tasks: list[str]
    rejected: dict[str, int]
    rejects: Path | None
    folder: Path

    @classmethod
    def load(cls, path: Path, folder: Path) -> "FileIndex":
        meta = json.loads((folder / "meta.json").read_text())
        arr = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("offset", "task", "pos_ptr", "pos_hash")}
        rej = folder / "rejects.jsonl"
        return cls(path, arr["offset"], arr["task"], arr["pos_ptr"], arr["pos_hash"], meta["tasks"],
                   meta["rejected"], rej if rej.exists() else None, folder)

    def __len__(self) -> int:
        return len(self.offset)


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}" if kind(path) == "jsonl" else f"{path}:row {line}"


def _join(path: Path, parts: list[Path], out: Path, build_s: float) -> None:
    """Concatenate the unit parts of one file in order into ``out`` (not yet published)."""
    metas = [json.loads((p / "part.json").read_text()) for p in parts]
    sizes = [len(np.load(p / "offset.npy", mmap_mode="r")) for p in parts]
    npos = [len(np.load(p / "pos_hash.npy", mmap_mode="r")) for p in parts]
    n, total_pos = sum(sizes), sum(npos)
    out.mkdir(parents=True, exist_ok=True)
    fmt = np.lib.format.open_memmap
    offset = fmt(out / "offset.npy", mode="w+", dtype=np.int64, shape=(n,))
    task = fmt(out / "task.npy", mode="w+", dtype=np.int32, shape=(n,))
    pos_ptr = fmt(out / "pos_ptr.npy", mode="w+", dtype=np.int64, shape=(n + 1,))
    pos_hash = fmt(out / "pos_hash.npy", mode="w+", dtype=np.int64, shape=(total_pos,))
    tasks: dict[str, int] = {}
    rejected: dict[str, int] = {}
    r = p_at = line0 = 0
    pos_ptr[0] = 0
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as rej:
        for part, meta, size, np_ in zip(parts, metas, sizes, npos):
            remap = np.asarray([tasks.setdefault(t, len(tasks)) for t in meta["tasks"]] or [0], dtype=np.int32)
            offset[r:r + size] = np.load(part / "offset.npy")
            task[r:r + size] = remap[np.load(part / "task.npy")]
            pos_ptr[r + 1:r + size + 1] = p_at + np.cumsum(np.load(part / "pos_count.npy"))
            pos_hash[p_at:p_at + np_] = np.load(part / "pos_hash.npy")
            for x in meta["rejects"]:
                key = f"{x['field']}: {x['error']}"
                rejected[key] = rejected.get(key, 0) + 1
                rej.write(json.dumps({"where": _where(path, line0 + x["local"]), "field": x["field"],
                                      "error": x["error"], "raw": x["raw"]}, ensure_ascii=False, default=str) + "\n")
            r, p_at, line0 = r + size, p_at + np_, line0 + meta["lines"]
    for a in (offset, task, pos_ptr, pos_hash):
        a.flush()
    del offset, task, pos_ptr, pos_hash
    if not rejected:
        (out / "rejects.jsonl").unlink()
    meta = {"version": INDEX_VERSION, "path": str(path), "records": n, "tasks": list(tasks), "rejected": rejected,
            "lines": line0, "units": len(parts), "build_seconds": round(build_s, 3)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _first_error(path: Path, parts: list[Path]) -> DataError | None:
    line0 = 0
    for part in parts:
        meta = json.loads((part / "part.json").read_text())
        if meta["error"]:
            e = meta["error"]
            return DataError(_where(path, line0 + e["local"]), e["field"], e["reason"])
        line0 += meta["lines"]
    return None


def open_indexes(paths: list[Path], *, require_neg: bool, on_error: str, index_dir: str | os.PathLike | None = None,
                 unit_bytes: int = UNIT_BYTES, unit_rows: int = UNIT_ROWS) -> tuple[list[FileIndex], dict]:
    """The index of every file, built where missing (all ranks share the work), then memory-mapped.

    Returns ``(indexes, stats)``; stats say which files were built and how long the build and the
    open took. Collective when a process group is up: every rank must call it with the same files.
    """
    from qwen3train import dist

    t0 = time.perf_counter()
    root = Path(index_dir) if index_dir else default_index_dir()
    keys = [file_key(p, require_neg, on_error) for p in paths]
    missing = [i for i, k in enumerate(keys) if not (root / k / "meta.json").exists()]
    missing = dist.broadcast_object(missing)  # one decision for all ranks, whatever each one saw
    built, scanned = [], 0
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        token = dist.broadcast_object(uuid.uuid4().hex[:8])
        work = [(i, u, rng) for i in missing for u, rng in enumerate(units(paths[i], unit_bytes, unit_rows))]
        for n, (i, u, (start, end)) in enumerate(work):
            if n % dist.world_size() != dist.rank():
                continue
            part = scan_unit(paths[i], start, end, require_neg, on_error)
            part.save(root / f"{keys[i]}.build-{token}" / f"part-{u:06d}")
            scanned += 1
        dist.barrier()
        t_scan = time.perf_counter() - t0
        err = None
        for i in missing:
            build = root / f"{keys[i]}.build-{token}"
            parts = sorted(build.glob("part-*"))
            err = err or _first_error(paths[i], parts)
            if err is None and dist.is_main():
                _join(paths[i], parts, build / "index", t_scan)
                final = root / keys[i]
                try:
                    (build / "index").rename(final)  # publish; a concurrent build that won is kept
                except OSError:
                    pass
            built.append(str(paths[i]))
        dist.barrier()
        if dist.is_main():
            for i in missing:
                shutil.rmtree(root / f"{keys[i]}.build-{token}", ignore_errors=True)
        if err is not None:
            raise err
    for p, k in zip(paths, keys):
        if not (root / k / "meta.json").exists():
            raise ConfigError(f"the record index of {p} ({root / k}) is not visible to this process: on a "
                              f"multi-node run data.index_dir must be a folder every node sees")
    indexes = [FileIndex.load(p, root / k) for p, k in zip(paths, keys)]
    return indexes, {"built": built, "units_scanned_here": scanned, "seconds": round(time.perf_counter() - t0, 3), "index_dir": str(root)}
