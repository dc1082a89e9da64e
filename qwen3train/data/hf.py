"""`datasets` sources: hub names or local files/folders through ``datasets.load_dataset``, in two kinds.

* **Arrow** (``streaming: false``): ``load_dataset`` writes its Arrow cache once; the record index
  (``data.index``) is built over its rows like any file, keyed by the dataset's fingerprint, and
  batches are planned over it (epochs, duplicate control, exact resume) as for JSONL.
* **Streaming** (``streaming: true``), for corpora larger than the disk: no cache, no random access.
  The stream is cut into **parts** when the run begins: its files when their count is a multiple of the
  process count (or ``stream_split: files``: whenever there are as many as processes), else one part per
  process (every ``parts``-th row, ``datasets.distributed.split_dataset_by_node``: each process reads the
  whole stream, as the start says in a note). Each rank reads the parts ``v % world == rank``, one after another in an order
  drawn per epoch, each shuffled with a buffer per epoch (``shuffle(seed, buffer_size)`` + ``set_epoch``);
  validates every row as it arrives (bad rows: the usual error naming the part and row, or counted and
  written to this rank's rejects file), and fills its share of each global batch with rows of distinct
  positives. A streaming source is one task (the ``task`` of its config, else the task of its first row; a
  row of another task is an error), so every rank's share of a batch has the same task. Its length is
  unknown: the run needs ``run.max_steps``. Resume is exact, **on any number of processes up to the
  parts** (a job requeued on fewer GPUs, or on more when the files allow): the checkpoint keeps each
  part's (epoch, rows read in it) and the rows read but waiting for a batch, with their fields; a resumed
  rank takes its parts with their positions and reads each past the rows already read, without
  validating them again. Within an epoch no row is read twice and none is left out, whatever the
  process counts on the way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3train.data import formats
from qwen3train.data.records import DataError, parse_record, doc_hash
from qwen3train.errors import ConfigError


# what a malformed row in a `datasets` source leaves the user (it reads blocks of rows, not lines)
BLOCK_READ = ("It reads rows in blocks, so a malformed row cannot be skipped (data.on_error): fix the file, or, "
              "for a JSONL file, list it in data.train_files, where each line is checked on its own")


def load(spec, streaming: bool):
    import datasets

    kw = dict(path=spec.dataset, name=spec.dataset_config, split=spec.split, streaming=streaming)
    if spec.data_files:
        kw["data_files"] = list(spec.data_files)
    try:
        return datasets.load_dataset(**kw)
    except (FileNotFoundError, ValueError, ConnectionError) as e:  # unknown name, missing files, bad split, no hub
        raise ConfigError(f"data source {label(spec)}: {e}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # a malformed file met building the Arrow cache
        cause = e.__cause__ or e
        what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
        raise DataError(label(spec), "<block>", f"the `datasets` reader failed: {what}. {BLOCK_READ}") from None



def stream_files(spec) -> list[str] | None:
    """The files ``datasets`` resolves ``spec`` to (its builder's ``data_files`` for the split), in order; None where
    it cannot say (a loading script, no files listed)."""
    import datasets

    kw = dict(path=spec.dataset, name=spec.dataset_config)
    if spec.data_files:
        kw["data_files"] = list(spec.data_files)
    try:
        data_files = datasets.load_dataset_builder(**kw).config.data_files
    except Exception:  # noqa: BLE001 - what load() met already said; a fingerprint is not the place to fail
        return None
    if not data_files:
        return None
    split = str(spec.split).split("[")[0]
    chosen = data_files.get(split) if split in data_files else [f for v in data_files.values() for f in v]
    return [str(f) for f in chosen] if chosen is not None else None


def label(spec) -> str:
    files = f" files={list(spec.data_files)}" if spec.data_files else ""
    return f"hf:{spec.dataset}{'/' + spec.dataset_config if spec.dataset_config else ''}[{spec.split}]{files}"


ENDS = 64 * 1024


def ends_digest(path: Path) -> str:
    """A digest of a file's first and last ``ENDS`` bytes (all of a smaller file): read in constant time whatever its
    size, it tells a rewritten file from the one a run began with where the sizes agree."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(ENDS))
        size = f.seek(0, 2)
        if size > ENDS:
            f.seek(max(ENDS, size - ENDS))
            h.update(f.read(ENDS))
    return h.hexdigest()


@dataclass(frozen=True)
class DatasetRef:
    """An Arrow dataset from ``load_dataset``, standing where a file path stands in the record index."""

    name: str
    dataset: object
    mapping: tuple | None = None  # its rows in another tool's format (qwen3train.data.formats)

    def __str__(self) -> str:
        return self.name

    @property
    def fingerprint(self) -> str:
        """Its content's (``datasets``' fingerprint) and, in another format, how it is read (the index holds the
        records as read)."""
        fp = str(getattr(self.dataset, "_fingerprint", "")) or self.name
        return fp if self.mapping is None else f"{fp}+{formats.digest(self.mapping)}"


def mapping(spec, ds):
    """How ``spec``'s rows are read as ours (``formats.resolve`` on the dataset's columns, where it knows them)."""
    names = getattr(ds, "column_names", None)
    return formats.resolve(getattr(spec, "format", "qwen3train"), getattr(spec, "columns", None),
                           list(names) if names is not None else None, label(spec))


def ref(spec) -> DatasetRef:
    """A non-streamed ``datasets`` source as the record index takes it."""
    ds = load(spec, streaming=False)
    return DatasetRef(label(spec), ds, mapping(spec, ds))


# the fields ``parse_record`` reads: what a checkpoint keeps of a row read but not yet batched
RECORD_FIELDS = ("query", "pos", "neg", "instruction", "prompt", "task", "type", "not_neg")


NETWORK_MODULES = ("httpx", "aiohttp", "urllib3", "requests", "fsspec", "huggingface_hub", "h11", "h2", "ssl")


def transient(err: BaseException) -> bool:
    """An error worth reading again: the OS's or a network library's (a reset, a timeout, a 5xx or 429), not a
    missing file or a refused permission, and not a decoding error."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, OSError):
        return True
    return any(c.__module__.split(".")[0] in NETWORK_MODULES for c in type(err).__mro__[:-2])


class StreamingSource:
    """This rank's parts of a streamed dataset, as rows for the loader's batches (see the module doc)."""

    streaming = True

    def __init__(self, spec, *, seed: int, rank: int, world: int, on_error: str = "raise",
                 num_hard_negatives: int = 0, rejects_path: str | Path | None = None,
                 shuffle_buffer: int = 10_000, retries: int = 5, retry_wait_s: float = 2.0) -> None:
        self.name, self.spec = label(spec), spec
        self.retries, self.retry_wait_s, self._failures = retries, retry_wait_s, 0
        self.k, self.on_error, self.seed = num_hard_negatives, on_error, seed
        self.rank, self.world = rank, world
        self.shuffle_buffer = shuffle_buffer
        self.task = spec.task or None
        self.task_names = [self.task] if self.task else []
        self.ds = load(spec, streaming=True)
        self.mapping = mapping(spec, self.ds)  # another tool's format: each row read as ours
        self.rejects_path = Path(rejects_path).with_suffix(f".rank{rank}.jsonl") if rejects_path else None
        self.rejected: dict[str, int] = {}
        self._split(self._parts(int(getattr(self.ds, "num_shards", 1) or 1), getattr(spec, "stream_split", "auto")))
        self._cur = None  # (part, its iterator) being read
        self._carry: list = []  # (part, row, record, raw row) read, waiting: its positive was already in the batch
        self._valid_in_pass = 0  # valid rows since this rank's epoch began (none in a whole pass: an error)

    def _parts(self, files: int, how: str) -> int:
        """The parts a new run cuts the stream into: its files, or one per process (rows)."""
        if how == "files" and files < self.world:
            raise ConfigError(f"{self.name}: stream_split=files gives each process files of its own, but the "
                              f"stream has {files} file(s) for {self.world} processes (stream_split=rows shares "
                              f"rows; or split the data into more files)")
        if how == "files" or (how == "auto" and files % self.world == 0):
            return files
        if self.rank == 0 and self.world > 1:
            print(f"note: {self.name}: {files} file(s) over {self.world} processes: each process reads the whole "
                  f"stream and keeps one row in {self.world} ({self.world}x the reading"
                  + (f"; stream_split=files reads each file once, with shares unequal by up to one file)"
                     if files >= self.world else "; more files than processes would let each read its own)"),
                  flush=True)
        return self.world

    def _split(self, parts: int) -> None:
        if parts < self.world:
            raise ConfigError(f"{self.name}: the checkpoint's stream is in {parts} parts (its files, or the processes "
                              f"its run began on); it resumes on at most {parts} processes, this run has {self.world} "
                              f"(or train on from its weights as a new run: model.init_from=<its checkpoint>)")
        self.parts = parts
        self.owned = [v for v in range(parts) if v % self.world == self.rank]
        self.state = {v: [0, 0] for v in self.owned}  # part -> [its epoch, rows read in that epoch]
        self._cur = None

    def __len__(self) -> int:
        return 0  # unknown

    @property
    def epoch(self) -> int:
        """This rank's epoch: the lowest of its parts' (a part read to its end is in the next one)."""
        return min(e for e, _ in self.state.values())

    def _part(self, v: int, epoch: int):
        """Part ``v``'s stream in ``epoch``: its files, or every ``parts``-th row, shuffled with a buffer."""
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.ds, rank=v, world_size=self.parts) if self.parts > 1 else self.ds
        ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(epoch)
        return ds

    def _replay(self, v: int, epoch: int, rows: int, hold=()):
        """Part ``v``'s iterator past its first ``rows`` rows (read again, not validated: a resume), and the
        rows among them numbered in ``hold``, as (row, raw row)."""
        it, held = iter(self._part(v, epoch)), {}
        for row in range(1, rows + 1):
            try:
                obj = next(it)
            except StopIteration:
                raise ConfigError(f"{self.name}: part {v} of {self.parts} has fewer than the {rows} rows the "
                                  f"checkpoint read in epoch {epoch}: the data changed since") from None
            if row in hold:
                held[row] = obj
        return it, [(row, held[row]) for row in hold if row in held]

    def cursor(self) -> dict:
        """Where this rank stands: each of its parts' [part, epoch, rows read in it], and the rows read but
        waiting (their positive was already in a batch) with their fields. JSON."""
        return {"parts": self.parts, "state": [[v, *self.state[v]] for v in self.owned],
                "waiting": [[v, row, {k: raw[k] for k in RECORD_FIELDS if k in raw}] for v, row, _, raw in self._carry]}

    def seek(self, cursors: list) -> None:
        """Resume from every rank's ``cursor()`` of the run that wrote the checkpoint, on any number of
        processes up to its parts: this rank takes the parts ``v % world == rank`` with their positions and
        waiting rows, and reads each past the rows already read. A checkpoint written before parts existed
        (per rank ``[epoch, rows read, waiting rows]``) has one part per process, as split then."""
        if cursors and isinstance(cursors[0], list):
            parts = len(cursors)
            state = {v: [int(c[0]), int(c[1])] for v, c in enumerate(cursors)}
            waiting, legacy = [], {v: [int(r) for r in c[2]] for v, c in enumerate(cursors) if c[2]}
        else:
            parts = int(cursors[0]["parts"])
            state = {int(v): [int(e), int(r)] for c in cursors for v, e, r in c["state"]}
            waiting, legacy = [w for c in cursors for w in c["waiting"]], {}
        if sorted(state) != list(range(parts)):
            raise ConfigError(f"{self.name}: the checkpoint's stream position covers parts {sorted(state)} of "
                              f"{parts}: it is damaged; resume from an earlier checkpoint")
        self._split(parts)
        self.state = {v: state[v] for v in self.owned}
        waiting = [(v, row, raw) for v, row, raw in waiting if v in self.state]
        for v in [v for v in self.owned if v in legacy]:
            waiting += [(v, row, raw) for row, raw in self._replay(v, self.state[v][0], max(legacy[v]), legacy[v])[1]]
        self._carry = [(v, row, parse_record(raw, f"{self.name}:part {v} row {row}"), raw) for v, row, raw in waiting]
        self._valid_in_pass = int(any(r for e, r in self.state.values() if e == self.epoch))

    def _next_valid(self) -> tuple:
        """(part, row number in its epoch, record, raw row) of the next valid row of this rank's parts:
        the parts of its epoch in an order drawn per epoch, each read to its end."""
        while True:
            if self._cur is None:
                e = self.epoch
                order = np.random.default_rng([self.seed, 0x7061727473, e]).permutation(self.parts).tolist()
                v = min((v for v in self.owned if self.state[v][0] == e), key=order.index)
            else:
                v = self._cur[0]
            e = self.state[v][0]
            try:
                if self._cur is None:
                    self._cur = (v, self._replay(v, e, self.state[v][1])[0])
                obj = next(self._cur[1])
            except StopIteration:  # this part's epoch is read; the next part, or this rank's next epoch
                self.state[v], self._cur = [e + 1, 0], None
                if self.epoch > e:
                    if not self._valid_in_pass:
                        raise ConfigError(f"{self.name}: a whole pass over parts {self.owned} of {self.parts} "
                                          f"(this process's share) found no valid row")
                    self._valid_in_pass = 0
                continue
            except (DataError, ConfigError):
                raise
            except Exception as err:  # noqa: BLE001 - the reader's: the network's (retried) or a malformed file
                self._cur = None
                self._read_failed(err, v, e)
                continue
            self._failures = 0
            self.state[v][1] += 1
            row = self.state[v][1]
            where = f"{self.name}:part {v} of {self.parts} epoch {e} row {row}"
            try:
                obj = formats.to_ours(obj, self.mapping, where)  # kept as ours (a checkpoint holds its fields)
                rec = parse_record(obj, where)
                if self.k > 0 and not rec.neg:
                    raise DataError(where, "neg", f"no hard negatives, but data.num_hard_negatives={self.k}")
                if self.task and rec.task not in ("default", self.task):
                    raise DataError(where, "task", f"{rec.task!r} in a streaming source of task {self.task!r} "
                                                   f"(one task per streaming source: split it into several)")
            except DataError as err:
                if self.on_error == "raise":
                    raise
                self._reject(err, obj)
                continue
            if self.task is None:
                self.task, self.task_names = rec.task, [rec.task]
            rec.task = self.task
            self._valid_in_pass += 1
            return v, row, rec, obj

    def _read_failed(self, err: Exception, v: int, e: int) -> None:
        """A read of part ``v`` failed: a network error is retried (the part opened again and read past the
        rows already read: the same rows follow), after a wait; a malformed file, or failures past the
        retries, stop the run with one line (its last checkpoint is kept)."""
        what = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        where = f"{self.name}:part {v} of {self.parts} epoch {e} after row {self.state[v][1]}"
        if not transient(err):
            if isinstance(err, ValueError):  # pyarrow's ArrowInvalid, a JSON or UTF-8 decoding error
                raise DataError(where, "<block>", f"the `datasets` reader failed: {what}. {BLOCK_READ}")
            raise err
        self._failures += 1
        if self._failures > self.retries:
            from qwen3train.errors import SourceUnreachable

            raise SourceUnreachable(f"{where}: reading failed {self._failures} times in a row ({what}); the last "
                                    f"checkpoint is kept: rerun the same command to resume once the source is "
                                    f"reachable (data.stream_retries={self.retries})")
        wait = min(self.retry_wait_s * 2 ** (self._failures - 1), 60.0)
        print(f"note (rank {self.rank}): {where}: {what}; reading it again in {wait:g} s "
              f"(try {self._failures} of {self.retries})", flush=True)
        time.sleep(wait)

    def take(self, n: int) -> list:
        """The next ``n`` valid rows with pairwise-distinct first positives, as (record id, record); a row
        whose positive is already in this batch waits for the next one. The id is the part and the row in
        its epoch, distinct across ranks (what negative sampling is seeded with)."""
        out, seen = [], set()
        waiting, self._carry = self._carry, []
        while len(out) < n:
            item = waiting.pop(0) if waiting else self._next_valid()
            h = doc_hash(item[2].pos[0])
            if h in seen:
                self._carry.append(item)
                continue
            seen.add(h)
            out.append(item)
        self._carry = waiting + self._carry
        return [(((v + 1) << 40) + row, rec) for v, row, rec, _ in out]

    def _reject(self, err: DataError, raw) -> None:
        key = f"{err.field}: {err.reason}"
        self.rejected[key] = self.rejected.get(key, 0) + 1
        if self.rejects_path is not None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rejects_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"where": err.where, "field": err.field, "error": err.reason, "raw": raw},
                                   ensure_ascii=False, default=str) + "\n")

    def fingerprint(self) -> dict:
        """What can be known of a stream without reading it (it may be larger than the disk): its name, the files
        ``datasets`` resolves it to (a hub dataset's name its commit: ``hf://datasets/<repo>@<sha>/...``), and of
        each local one its size and a digest of its first and last 64 KiB. Another revision, a file added, removed,
        grown, or rewritten to the same size (other records, or an edit near either end) is seen on resume; an edit
        of the same size inside a large file's middle is not. ``train.identity.check_data`` compares it."""
        out = {"streamed": self.name}
        files = stream_files(self.spec)
        if files is not None:
            out["files"] = [{"file": f} | ({"bytes": Path(f).stat().st_size, "ends": ends_digest(Path(f))}
                                           if Path(f).is_file() else {}) for f in files]
        return out

    def summary(self) -> dict:
        return {"records": None, "streaming": True, "source": self.name, "rank": self.rank, "tasks": self.task_names,
                "parts": self.parts, "parts_read": self.owned,
                "rejected": sum(self.rejected.values()), "rejected_by_reason": dict(self.rejected),
                "rejects_file": str(self.rejects_path) if self.rejected and self.rejects_path else None}
