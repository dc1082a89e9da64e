"""Indexed record sources: JSONL, Parquet and Hugging Face datasets saved to disk.

Each file is scanned and validated once into a shared on-disk index (``qwen3train.data.index``: byte
offset or row, task id, hashes of the positives), memory-mapped by every rank: record texts stay on
disk and are read back on demand, and the index sits once in the page cache whatever the number of
ranks. Bad records raise a DataError naming file, line and field; with ``on_error="skip"`` they are
counted by reason and written, with the raw line, to a rejects file (once, by rank 0).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from qwen3train.data import index
from qwen3train.data.formats import FORMATS, to_ours
from qwen3train.data.hf import DatasetRef
from qwen3train.data.jsonl import COMPRESSED
from qwen3train.data.records import DataError, Record, parse_json_line, parse_record
from qwen3train.errors import ConfigError


STREAM_SPLITS = ("auto", "files", "rows")


@dataclass
class MixtureSource:
    """One source of a mixture: its share of the global batches, and either ``files`` (as
    ``train_files``) or a ``datasets`` source: ``dataset`` (a hub name, or a builder such as ``json``
    / ``parquet`` with ``data_files``), ``dataset_config``, ``split``; ``streaming: true`` streams it
    (corpora larger than the disk; ``task`` names its one task, ``shuffle_buffer`` its shuffling,
    ``stream_split`` how the processes share it), ``false`` loads it into the Arrow cache and indexes it
    like a file (``qwen3train.data.hf``).

    stream_split: ``auto`` (its files when each process gets as many, else rows), ``files`` (each file read
        by one process, whatever their count: read once, but a process with one file more than another
        goes through its share more slowly, so its files' rows come less often), ``rows`` (every process
        reads the whole stream and keeps every n-th row: equal shares, n times the reading).
    """

    files: list[str] = field(default_factory=list)
    weight: float = 1.0
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    streaming: bool = False
    task: str | None = None
    shuffle_buffer: int = 10_000
    stream_split: str = "auto"
    # a dataset in another tool's format, read as ours row by row (qwen3train.data.formats): tevatron
    # (positive_passages / negative_passages), sentence-transformers (columns in order: query, positive,
    # negatives), ms-swift (messages / positive_messages / negative_messages; a system message is the
    # instruction), and/or columns: {query: <column>, pos: <column or [columns]>, neg: ...}
    format: str = "qwen3train"
    columns: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.files) == bool(self.dataset):
            raise ValueError("a data.mixture source needs files or dataset (one of the two)")
        if self.format not in FORMATS:
            raise ValueError(f"a data.mixture source's format must be one of {FORMATS}, got {self.format!r}")
        if self.files and (self.format != "qwen3train" or self.columns):
            raise ValueError("a data.mixture source's format/columns read a `datasets` source (dataset: json, "
                             "data_files: [...] for JSONL files), or convert the files once with make prepare")
        if self.stream_split not in STREAM_SPLITS:
            raise ValueError(f"a data.mixture source's stream_split must be one of {STREAM_SPLITS}, got "
                             f"{self.stream_split!r}")


@dataclass
class DataConfig:
    """Training data for one stage.

    train_files: JSONL (``.jsonl``/``.json``), Parquet (``.parquet``) files, or folders written by
        ``datasets.Dataset.save_to_disk``; globs allowed.
    mixture: instead of ``train_files``, several sources with weights (``[{files: [...], weight: 3},
        {files: [...], weight: 1}]``): each global batch comes from one source, drawn by weight
        (``qwen3train.data.loader``); e.g. tasks or languages mixed at chosen rates.
    num_hard_negatives: K negatives per query (sampled from ``neg``; resampled with replacement when
        a record has fewer; a record with none is an error when K > 0).
    on_error: ``raise`` (default: stop at the first bad record, naming file:line and field) or
        ``skip`` (count, report, write to ``rejects_file``; default ``<run dir>/rejects.jsonl``).
    task_instructions: task -> instruction, over the built-in registry.
    symmetric_tasks: tasks whose documents get the instruction too (STS, bitext, ...).
    index_dir: where the shared record indexes live (default ``$QWEN3TRAIN_CACHE/index``, i.e.
        ``~/.cache/qwen3train/index``); on a cluster, a folder every node sees.
    prefetch: batches made ahead on a background thread while a step runs (records read, tokenized, micro
        batches cut and packed: ``data.loader.Ahead``); 0 makes each in the loop. The same batches either
        way; ``data_wait_s`` in metrics.jsonl is what the step still waited for them.
    stream_retries: a streamed source whose read fails (a connection reset, a timeout, a rate limit: the
        network's errors, not a malformed file) is opened again and read past the rows already read, up to
        this many times in a row, after waits of 2, 4, 8 ... 60 s; then the run stops with one line, its last
        checkpoint kept. The same rows either way (``data.hf``).
    """

    train_files: list[str] = field(default_factory=list)
    mixture: list[MixtureSource] = field(default_factory=list)
    num_hard_negatives: int = 0
    on_error: str = "raise"
    rejects_file: str | None = None
    task_instructions: dict[str, str] = field(default_factory=dict)
    symmetric_tasks: list[str] = field(default_factory=list)
    index_dir: str | None = None
    prefetch: int = 1
    stream_retries: int = 5

    def __post_init__(self) -> None:
        if self.stream_retries < 0:
            raise ValueError(f"data.stream_retries must be >= 0, got {self.stream_retries}")
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.mixture and self.train_files:
            raise ValueError("set data.train_files or data.mixture, not both")
        if self.num_hard_negatives < 0:
            raise ValueError("data.num_hard_negatives must be >= 0")


def expand_files(patterns: list[str]) -> list[Path]:
    import glob

    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits or not all(Path(h).exists() for h in hits):
            raise FileNotFoundError(f"data file not found: {pat}")
        out += [Path(h) for h in hits]
    if not out:
        raise ConfigError("data.train_files is empty")
    return out


class IndexedSource:
    """Random access to validated records by global index, over the shared on-disk index of each file
    (``qwen3train.data.index``: built once, memory-mapped by every rank and every restart)."""

    def __init__(self, paths: list[Path], *, num_hard_negatives: int = 0, on_error: str = "raise",
                 rejects_path: str | os.PathLike | None = None, index_dir: str | os.PathLike | None = None,
                 unit_bytes: int = index.UNIT_BYTES) -> None:
        from qwen3train import dist

        self.paths = [p if isinstance(p, DatasetRef) else Path(p) for p in paths]
        for p in self.paths:
            if not isinstance(p, DatasetRef) and p.suffix.lower() in COMPRESSED:
                raise ConfigError(f"{p}: a compressed file cannot be indexed (records are read at their byte "
                                  f"offsets): decompress it once ({COMPRESSED[p.suffix.lower()]} {p}), or, for "
                                  f"training, name it as a `datasets` source: data.mixture=[{{dataset: json, "
                                  f"data_files: [{p}]}}]")
        self.k = num_hard_negatives
        self.on_error = on_error
        # what each file was when indexed (taken first: a change during the indexing is a change too)
        self._stamps = [None if isinstance(p, DatasetRef) else index.file_state(p)[1] for p in self.paths]
        self.files, self.index_stats = index.open_indexes(self.paths, require_neg=self.k > 0, on_error=on_error,
                                                          index_dir=index_dir, unit_bytes=unit_bytes)
        self.starts = np.cumsum([0] + [len(f) for f in self.files]).astype(np.int64)
        names: dict[str, int] = {}  # global task ids, in order of first appearance
        self._remap = [np.asarray([names.setdefault(t, len(names)) for t in f.tasks] or [0], dtype=np.int32)
                       for f in self.files]
        self.task_names: list[str] = list(names)
        self.rejected: Counter = Counter()
        for f in self.files:
            self.rejected.update(f.rejected)
        self.rejects_path = Path(rejects_path) if rejects_path else None
        if self.rejected and self.rejects_path is not None and dist.is_main():  # one copy, by one rank
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rejects_path, "wb") as out:
                for f in self.files:
                    if f.rejects is not None:
                        out.write(f.rejects.read_bytes())
        elif self.rejected and self.rejects_path is None:
            self.rejects_path = next(f.rejects for f in self.files if f.rejects is not None)
        self._arrow: dict[int, object] = {}
        self._handles: dict[int, object] = {}

    kind = staticmethod(index.kind)

    # ---- vectorised views (batch planning) -------------------------------------------------------
    @property
    def task_idx(self) -> np.ndarray:
        """Global task id of every record (int32, 4 bytes per record, computed on each call and not kept:
        planning needs it once per epoch, and a kept copy would be private to each rank)."""
        if len(self.files) == 1 and np.array_equal(self._remap[0], np.arange(len(self._remap[0]))):
            return self.files[0].task  # ids already global: the memory-mapped array itself
        return np.concatenate([r[np.asarray(f.task)] for r, f in zip(self._remap, self.files)]
                              or [np.zeros(0, np.int32)])

    def num_pos_of(self, idx: np.ndarray) -> np.ndarray:
        fi, loc = self._locate(idx)
        out = np.empty(len(idx), dtype=np.int64)
        for k, f in enumerate(self.files):
            m = fi == k
            if m.any():
                out[m] = f.pos_ptr[loc[m] + 1] - f.pos_ptr[loc[m]]
        return out

    def positive_hashes(self, idx: np.ndarray, j: np.ndarray) -> np.ndarray:
        fi, loc = self._locate(idx)
        out = np.empty(len(idx), dtype=np.int64)
        for k, f in enumerate(self.files):
            m = fi == k
            if m.any():
                out[m] = f.pos_hash[f.pos_ptr[loc[m]] + j[m]]
        return out

    def _locate(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        fi = np.searchsorted(self.starts, idx, side="right") - 1
        return fi, idx - self.starts[fi]

    # ---- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.starts[-1])

    def num_pos(self, i: int) -> int:
        return int(self.num_pos_of(np.asarray([i]))[0])

    def positive_hash(self, i: int, j: int) -> int:
        return int(self.positive_hashes(np.asarray([i]), np.asarray([j]))[0])

    def __getitem__(self, i: int) -> Record:
        fi, loc = self._locate(np.asarray([i]))
        fi, off = int(fi[0]), int(self.files[int(fi[0])].offset[int(loc[0])])
        path = self.paths[fi]
        if self.kind(path) != "jsonl":
            if fi not in self._arrow:  # loaded once (an Arrow copy): later changes to the file cannot reach it
                self.check_unchanged([fi])
                self._arrow[fi] = index._arrow(path)
            where = f"{path}:row {off + 1}"
            return parse_record(to_ours(self._arrow[fi][off], getattr(path, "mapping", None), where), where)
        if fi not in self._handles:
            self._handles[fi] = open(path, "rb")
            self.check_unchanged([fi])  # the file this handle reads is the one indexed
        h = self._handles[fi]
        h.seek(off)
        try:
            return parse_json_line(h.readline(), f"{path}:offset {off}")
        except DataError:
            self.check_unchanged([fi])  # a record that was valid when indexed: the file changed, say that
            raise

    def records(self, idx) -> list[Record]:
        """The records at global indices ``idx``; then the files they came from are checked to be the ones
        indexed (``check_unchanged``): a file rewritten in place under a running job would otherwise give
        other text at the indexed offsets, or a "bad record" that is not one. One ``fstat`` per file read."""
        out = [self[int(i)] for i in idx]
        if len(out):
            self.check_unchanged(np.unique(self._locate(np.asarray(idx))[0]).tolist())
        return out

    def check_unchanged(self, which=None) -> None:
        """Each file in ``which`` (default: all) has the size and modification time it had when indexed (the
        open handle's file, for a JSONL file being read: a file replaced by a rename keeps the old one, whose
        offsets are right; an Arrow copy already loaded is left alone). Otherwise a ``DataError`` naming it."""
        for fi in range(len(self.paths)) if which is None else which:
            then, path = self._stamps[fi], self.paths[fi]
            if then is None or fi in self._arrow:
                continue
            h = self._handles.get(fi)
            st = os.fstat(h.fileno()) if h is not None else None
            now = [(st.st_size, st.st_mtime_ns)] if st is not None else index.file_state(path)[1]
            if now != then:
                raise DataError(str(path), "<file>", f"changed while this run reads it ({_state_text(then)} when "
                                f"indexed, now {_state_text(now)}): its index no longer locates its records; put "
                                f"it back as it was and rerun to resume from the last checkpoint (new data goes to "
                                f"a new file; run.resume=force resumes on changed data)")

    def fingerprint(self) -> list[dict]:
        """What each file held when indexed: its records, an XXH3-128 digest of its index (every record's
        offset or row, task, positives' count and hashes), a few GB/s from the memory-mapped arrays, and the
        digest of its bytes (rows) the index build took as it read them (``content``: a negative or a query
        edited in place to the same length changes no offset). Not the file's time stamp: a copy or a ``touch``
        leaves the content, and the digests, as they were. Read on resume (``train.identity.check_data``):
        another order of batches, or other texts in them, would follow from other data."""
        from xxhash import xxh3_128

        out = []
        for path, f in zip(self.paths, self.files):
            h = xxh3_128(json.dumps(f.tasks).encode())
            for arr in (f.offset, f.task, f.pos_ptr, f.pos_hash):
                h.update(np.ascontiguousarray(arr).data)
            name = path.name if isinstance(path, DatasetRef) else str(path)
            out.append({"file": name, "records": len(f), "digest": h.hexdigest()}
                       | ({"content": f.content} if f.content else {}))
        return out

    def heaviest(self, n: int, sample: int = 4096) -> list[tuple[int, int]]:
        """(size, global index) of the ``n`` largest records, largest first: in a JSONL file the bytes from
        a record's line to the next one's (read from the index, no text read; chunked, so 150M records
        need no 1 GB temporary), in other files the characters of an evenly spaced sample of ``sample`` rows.
        For the memory rehearsal (``train.memory``)."""
        best: list[tuple[int, int]] = []
        for fi, f in enumerate(self.files):
            base = int(self.starts[fi])
            if self.kind(self.paths[fi]) == "jsonl":
                for lo in range(0, len(f), 1 << 24):
                    hi = min(lo + (1 << 24), len(f))
                    off = np.asarray(f.offset[lo:hi + 1], dtype=np.int64)  # one more line start, or the end:
                    if hi == len(f):
                        off = np.append(off, os.path.getsize(self.paths[fi]))
                    size = np.diff(off)
                    top = np.argsort(-size, kind="stable")[:n]
                    best += [(int(size[i]), base + lo + int(i)) for i in top]
            elif len(f):
                for i in np.unique(np.linspace(0, len(f) - 1, min(sample, len(f))).astype(np.int64)):
                    r = self[base + int(i)]
                    best.append((len(r.query) + sum(map(len, r.pos)) + sum(map(len, r.neg)), base + int(i)))
            best = sorted(best, key=lambda t: -t[0])[:n]
        return best

    def summary(self) -> dict:
        return {"records": len(self), "files": [str(p) for p in self.paths], "tasks": self.task_names,
                "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected),
                "rejects_file": str(self.rejects_path) if self.rejected and self.rejects_path else None,
                "index": {**self.index_stats, "folders": [str(f.folder) for f in self.files]}}


def _state_text(state: list) -> str:
    import datetime

    size = sum(s[-2] for s in state)
    newest = max((s[-1] for s in state), default=0)
    when = datetime.datetime.fromtimestamp(newest / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    return f"{size:,} bytes{f' in {len(state)} files' if len(state) > 1 else ''}, modified {when}"
