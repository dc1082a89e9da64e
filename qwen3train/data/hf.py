"""`datasets` sources: hub names or local files/folders through ``datasets.load_dataset``, in two kinds.

* **Arrow** (``streaming: false``): ``load_dataset`` writes its Arrow cache once; the record index
  (``data.index``) is built over its rows like any file, keyed by the dataset's fingerprint, and
  batches are planned over it (epochs, duplicate control, exact resume) as for JSONL.
* **Streaming** (``streaming: true``), for corpora larger than the disk: no cache, no random access.
  Each rank reads its own shard (``datasets.distributed.split_dataset_by_node``) of the stream,
  shuffled with a buffer per epoch (``shuffle(seed, buffer_size)`` + ``set_epoch``), validates every
  row as it arrives (bad rows: the usual error naming the row, or counted and written to this rank's
  rejects file), and fills its share of each global batch with rows of distinct positives. A
  streaming source is one task (the ``task`` of its config, else the task of its first row; a row of
  another task is an error), so every rank's share of a batch has the same task. Its length is
  unknown: the run needs ``run.max_steps``. Resume is exact: each rank's cursor is (epoch, rows read
  in it), and a resumed rank reads past those rows again without validating them; it needs the same
  number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen3train.data.records import DataError, parse_record, doc_hash
from qwen3train.errors import ConfigError


def load(spec, streaming: bool):
    import datasets

    kw = dict(path=spec.dataset, name=spec.dataset_config, split=spec.split, streaming=streaming)
    if spec.data_files:
        kw["data_files"] = list(spec.data_files)
    try:
        return datasets.load_dataset(**kw)
    except (FileNotFoundError, ValueError) as e:  # unknown name, missing files, bad split
        raise ConfigError(f"data source {label(spec)}: {e}") from None


def label(spec) -> str:
    files = f" files={list(spec.data_files)}" if spec.data_files else ""
    return f"hf:{spec.dataset}{'/' + spec.dataset_config if spec.dataset_config else ''}[{spec.split}]{files}"


@dataclass(frozen=True)
class DatasetRef:
    """An Arrow dataset from ``load_dataset``, standing where a file path stands in the record index."""

    name: str
    dataset: object

    def __str__(self) -> str:
        return self.name

    @property
    def fingerprint(self) -> str:
        return str(getattr(self.dataset, "_fingerprint", "")) or self.name


class StreamingSource:
    """This rank's shard of a streamed dataset, as rows for the loader's batches (see the module doc)."""

    streaming = True

    def __init__(self, spec, *, seed: int, rank: int, world: int, on_error: str = "raise",
                 num_hard_negatives: int = 0, rejects_path: str | Path | None = None,
                 shuffle_buffer: int = 10_000) -> None:
        from datasets.distributed import split_dataset_by_node

        self.name = label(spec)
        self.k, self.on_error, self.seed = num_hard_negatives, on_error, seed
        self.rank, self.world = rank, world
        self.shuffle_buffer = shuffle_buffer
        self.task = spec.task or None
        self.task_names = [self.task] if self.task else []
        ds = load(spec, streaming=True)
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds
        self.rejects_path = Path(rejects_path).with_suffix(f".rank{rank}.jsonl") if rejects_path else None
        self.rejected: dict[str, int] = {}
        self.epoch, self.rows_read = 0, 0
        self._it = None
        self._carry: list = []  # (row, record) whose positive was already in the batch being filled
        self.dropped_duplicates = 0

    def __len__(self) -> int:
        return 0  # unknown

    def _open(self) -> None:
        ds = self.ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(self.epoch)
        self._it = iter(ds)

    def cursor(self) -> list:
        """[epoch, rows read in it, rows read but waiting (their positive was already in a batch)]."""
        return [self.epoch, self.rows_read, [row for row, _ in self._carry]]

    def seek(self, cursor: list) -> None:
        """Resume: the same epoch's shuffled stream, read past the rows already read (the waiting ones
        are validated and held again)."""
        epoch, rows_read, waiting = cursor
        self.epoch, self.rows_read, self._carry = int(epoch), 0, []
        self._open()
        hold = set(waiting)
        for _ in range(int(rows_read)):
            obj = next(self._it)
            self.rows_read += 1
            if self.rows_read in hold:
                self._carry.append((self.rows_read, parse_record(obj, f"{self.name}:row {self.rows_read}")))
        order = {row: n for n, row in enumerate(waiting)}
        self._carry.sort(key=lambda x: order[x[0]])

    def _next_valid(self):
        """(row number in this epoch, record) of the next valid row of this rank's shard."""
        while True:
            if self._it is None:
                self._open()
            try:
                obj = next(self._it)
            except StopIteration:  # next epoch; rows still waiting belong to the old one: dropped, counted
                self.dropped_duplicates += len(self._carry)
                self.epoch, self.rows_read, self._it, self._carry = self.epoch + 1, 0, None, []
                continue
            self.rows_read += 1
            where = f"{self.name}:rank {self.rank} epoch {self.epoch} row {self.rows_read}"
            try:
                rec = parse_record(obj, where)
                if self.k > 0 and not rec.neg:
                    raise DataError(where, "neg", f"no hard negatives, but data.num_hard_negatives={self.k}")
                if self.task and rec.task not in ("default", self.task):
                    raise DataError(where, "task", f"{rec.task!r} in a streaming source of task {self.task!r} "
                                                   f"(one task per streaming source: split it into several)")
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self._reject(e, obj)
                continue
            if self.task is None:
                self.task, self.task_names = rec.task, [rec.task]
            rec.task = self.task
            return self.rows_read, rec

    def take(self, n: int) -> list:
        """The next ``n`` valid (row, record) pairs with pairwise-distinct first positives; a record whose
        positive is already in this batch waits for the next one."""
        out, seen = [], set()
        waiting, self._carry = self._carry, []
        while len(out) < n:
            row, rec = waiting.pop(0) if waiting else self._next_valid()
            h = doc_hash(rec.pos[0])
            if h in seen:
                self._carry.append((row, rec))
                continue
            seen.add(h)
            out.append((row, rec))
        self._carry = waiting + self._carry
        return out

    def _reject(self, err: DataError, raw) -> None:
        key = f"{err.field}: {err.reason}"
        self.rejected[key] = self.rejected.get(key, 0) + 1
        if self.rejects_path is not None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rejects_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"where": err.where, "field": err.field, "error": err.reason, "raw": raw},
                                   ensure_ascii=False, default=str) + "\n")

    def summary(self) -> dict:
        return {"records": None, "streaming": True, "source": self.name, "rank": self.rank, "tasks": self.task_names,
                "dropped_duplicates": self.dropped_duplicates,
                "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected),
                "rejects_file": str(self.rejects_path) if self.rejected and self.rejects_path else None}
