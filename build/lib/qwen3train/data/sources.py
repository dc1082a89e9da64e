"""Indexed record sources: JSONL, Parquet and Hugging Face datasets saved to disk.

A source scans its files once, validating every record, and keeps only a compact index (file,
byte offset or row, task id, hashes of the positives): record texts stay on disk and are read back
on demand, so a corpus larger than memory trains with memory bounded by the index (~30 bytes per
record). Bad records raise a DataError naming file, line and field; with ``on_error="skip"`` they
are counted by reason and written, with the raw line, to a rejects file.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qwen3train.data.records import DataError, Record, parse_json_line, parse_record, text_hash


@dataclass
class DataConfig:
    """Training data for one stage.

    train_files: JSONL (``.jsonl``/``.json``), Parquet (``.parquet``) files, or folders written by
        ``datasets.Dataset.save_to_disk``; globs allowed.
    num_hard_negatives: K negatives per query (sampled from ``neg``; resampled with replacement when
        a record has fewer; a record with none is an error when K > 0).
    on_error: ``raise`` (default: stop at the first bad record, naming file:line and field) or
        ``skip`` (count, report, write to ``rejects_file``; default ``<run dir>/rejects.jsonl``).
    task_instructions: task -> instruction, over the built-in registry.
    symmetric_tasks: tasks whose documents get the instruction too (STS, bitext, ...).
    """

    train_files: list[str] = field(default_factory=list)
    num_hard_negatives: int = 0
    on_error: str = "raise"
    rejects_file: str | None = None
    task_instructions: dict[str, str] = field(default_factory=dict)
    symmetric_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
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
        raise ValueError("data.train_files is empty")
    return out


class IndexedSource:
    """Random access to validated records by index; see the module docstring."""

    def __init__(self, paths: list[Path], *, num_hard_negatives: int = 0, on_error: str = "raise",
                 rejects_path: str | os.PathLike | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.k = num_hard_negatives
        self.on_error = on_error
        self.rejects_path = Path(rejects_path) if rejects_path else None
        self.file_idx = array("i")
        self.offset = array("q")  # byte offset (JSONL) or row number (Arrow)
        self.task_idx = array("i")
        self.pos_hash = array("q")  # hashes of all positives, CSR by pos_ptr
        self.pos_ptr = array("q", [0])
        self.task_names: list[str] = []
        self.rejected: Counter = Counter()
        self._tasks: dict[str, int] = {}
        self._arrow: dict[int, object] = {}
        self._handles: dict[int, object] = {}
        self._rejects = None
        try:
            for fi, path in enumerate(self.paths):
                self._scan(fi, path)
        finally:
            if self._rejects is not None:
                self._rejects.close()

    # ---- scanning -----------------------------------------------------------------------------
    @staticmethod
    def kind(path: Path) -> str:
        if path.is_dir():
            return "hf_disk"
        if path.suffix == ".parquet":
            return "parquet"
        return "jsonl"

    def _scan(self, fi: int, path: Path) -> None:
        if self.kind(path) == "jsonl":
            with open(path, "rb") as f:
                pos, lineno = 0, 0
                for line in f:  # splits on b"\n" only: texts may hold U+2028
                    lineno += 1
                    start, pos = pos, pos + len(line)
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    self._add(fi, start, where, lambda: parse_json_line(line, where), line)
        else:
            ds = self._arrow_ds(fi)
            for row in range(len(ds)):
                obj, where = ds[row], f"{path}:row {row + 1}"
                self._add(fi, row, where, lambda: parse_record(obj, where), obj)

    def _add(self, fi: int, off: int, where: str, parse, raw) -> None:
        try:
            rec = parse()
            if self.k > 0 and not rec.neg:
                raise DataError(where, "neg", f"no hard negatives, but data.num_hard_negatives={self.k}")
        except DataError as e:
            if self.on_error == "raise":
                raise
            self._reject(e, raw)
            return
        self.file_idx.append(fi)
        self.offset.append(off)
        if rec.task not in self._tasks:
            self._tasks[rec.task] = len(self.task_names)
            self.task_names.append(rec.task)
        self.task_idx.append(self._tasks[rec.task])
        for p in rec.pos:
            self.pos_hash.append(text_hash(p))
        self.pos_ptr.append(len(self.pos_hash))

    def _reject(self, err: DataError, raw) -> None:
        self.rejected[f"{err.field}: {err.reason}"] += 1
        if self.rejects_path is None:
            return
        if self._rejects is None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            self._rejects = open(self.rejects_path, "w", encoding="utf-8")
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace").rstrip("\n")
        self._rejects.write(json.dumps({"where": err.where, "field": err.field, "error": err.reason,
                                        "raw": raw}, ensure_ascii=False, default=str) + "\n")

    def _arrow_ds(self, fi: int):
        if fi not in self._arrow:
            import datasets

            path = self.paths[fi]
            if self.kind(path) == "hf_disk":
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.Dataset.from_parquet(str(path))
            self._arrow[fi] = ds
        return self._arrow[fi]

    # ---- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offset)

    def num_pos(self, i: int) -> int:
        return self.pos_ptr[i + 1] - self.pos_ptr[i]

    def positive_hash(self, i: int, j: int) -> int:
        return self.pos_hash[self.pos_ptr[i] + j]

    def __getitem__(self, i: int) -> Record:
        fi, off = self.file_idx[i], self.offset[i]
        path = self.paths[fi]
        if self.kind(path) != "jsonl":
            return parse_record(self._arrow_ds(fi)[off], f"{path}:row {off + 1}")
        if fi not in self._handles:
            self._handles[fi] = open(path, "rb")
        h = self._handles[fi]
        h.seek(off)
        return parse_json_line(h.readline(), f"{path}:offset {off}")

    def summary(self) -> dict:
        return {"records": len(self), "files": [str(p) for p in self.paths], "tasks": self.task_names,
                "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected),
                "rejects_file": str(self.rejects_path) if self.rejected and self.rejects_path else None}
