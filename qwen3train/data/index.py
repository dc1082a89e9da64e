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
from qwen3train.data.records import DataError
from qwen3train.data.scan import _arrow, kind, scan_unit
from qwen3train.errors import ConfigError

INDEX_VERSION = 2  # 2: positives hashed with records.doc_hash (XXH3)
UNIT_BYTES = 64 << 20
UNIT_ROWS = 1 << 20


def default_index_dir() -> Path:
    """``$QWEN3TRAIN_INDEX_DIR``, else ``$QWEN3TRAIN_CACHE/index``, else ``~/.cache/qwen3train/index``."""
    if os.environ.get("QWEN3TRAIN_INDEX_DIR"):
        return Path(os.environ["QWEN3TRAIN_INDEX_DIR"])
    return Path(os.environ.get("QWEN3TRAIN_CACHE", Path.home() / ".cache" / "qwen3train")) / "index"


def file_key(path: Path, require_neg: bool, on_error: str) -> str:
    """Identity of (data, validation settings): changes whenever either does."""
    if isinstance(path, DatasetRef):  # load_dataset's Arrow cache: its fingerprint names its content
        real, state = path.name, [path.fingerprint]
    else:
        real, state = file_state(path)
    blob = json.dumps({"v": INDEX_VERSION, "path": str(real), "state": state, "require_neg": require_neg,
                       "on_error": on_error})
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def file_state(path: Path):
    """(real path, [(size, mtime_ns)] of the file, or of every file under a folder)."""
    real = Path(os.path.realpath(path))
    if real.is_dir():
        files = sorted(p for p in real.rglob("*") if p.is_file())
        state = [(str(p.relative_to(real)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    else:
        st = real.stat()
        state = [(st.st_size, st.st_mtime_ns)]
    return real, state


# ---- units -----------------------------------------------------------------------------------
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
    content: str | None = None  # digest of the bytes (rows) it was built from; None: an index built before it

    @classmethod
    def load(cls, path: Path, folder: Path) -> "FileIndex":
        meta = json.loads((folder / "meta.json").read_text())
        arr = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("offset", "task", "pos_ptr", "pos_hash")}
        rej = folder / "rejects.jsonl"
        return cls(path, arr["offset"], arr["task"], arr["pos_ptr"], arr["pos_hash"], meta["tasks"],
                   meta["rejected"], rej if rej.exists() else None, folder, meta.get("content"))

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
    from xxhash import xxh3_128

    content = xxh3_128("".join(m["content"] or "" for m in metas).encode()).hexdigest()  # the units' in order
    meta = {"version": INDEX_VERSION, "path": str(path), "records": n, "tasks": list(tasks), "rejected": rejected,
            "lines": line0, "units": len(parts), "content": content, "build_seconds": round(build_s, 3)}
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
            err.collective = True  # every rank raises it (the parts are shared): printed once
            raise err
    for p, k in zip(paths, keys):
        if not (root / k / "meta.json").exists():
            raise ConfigError(f"the record index of {p} ({root / k}) is not visible to this process: on a "
                              f"multi-node run data.index_dir must be a folder every node sees")
    indexes = [FileIndex.load(p, root / k) for p, k in zip(paths, keys)]
    return indexes, {"built": built, "units_scanned_here": scanned, "seconds": round(time.perf_counter() - t0, 3), "index_dir": str(root)}
