"""The loader: sources, epoch plans, this rank's share of each batch, and the resume cursor.

``for batch in loader:`` yields this rank's collated share of the next global batch, forever.

* **One source** (``data.train_files``): batches follow the source's epoch plans, epoch after epoch.
* **Streamed sources** (``datasets`` with ``streaming: true``, ``data.hf``): each rank reads its own
  parts of the stream in order; see that module for what is kept exact (a resume on another process count too).
* **A mixture** (``data.mixture``: several sources with weights, e.g. tasks or languages): each global
  step draws one source with probability ``weight / sum(weights)`` (a pure function of the seed and
  the step, so every rank draws the same and a resumed run draws on), and takes that source's next
  batch; every source walks through its own epoch plans. Batches stay single-task, as the loss needs.

A plan is computed once per epoch per source (all ranks compute the same one, ``data.batching``) and
only this rank's columns are kept. ``state()`` / ``seek(state)`` carry the cursor through a checkpoint:
the step and, per source, the epoch and the next batch of that epoch's plan.
"""

from __future__ import annotations

import dataclasses

import time
from typing import Callable, Iterator

import numpy as np

from qwen3train.data.batching import PLAN_VERSION, Plan, plan
from qwen3train.errors import ConfigError


class _Stream:
    """One source's walk through its epoch plans (this rank's columns)."""

    def __init__(self, source, weight: float, base: int, loader: "Loader") -> None:
        self.source, self.weight, self.base, self.loader = source, weight, base, loader
        self.epoch, self.position = 0, 0
        self._plans: dict[int, Plan] = {}
        self.stats: dict = {}

    def plan(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            ld = self.loader
            full = plan(self.source, ld.global_batch, ld.seed, epoch, ld.plan_version)
            self.stats = {"epoch": epoch, "batches": len(full), **full.stats}
            self._plans = {epoch: full.columns(ld.lo, ld.lo + ld.local)}
        return self._plans[epoch]

    def steps_per_epoch(self) -> int:
        n = len(self.plan(0))
        if n == 0:
            raise ConfigError(f"{len(self.source)} usable records of {[str(p) for p in self.source.paths]} make no "
                              f"global batch of {self.loader.global_batch} (single-task batches, duplicates "
                              f"deferred): lower engine.global_batch_size")
        return n

    def check(self) -> None:
        self.steps_per_epoch()

    def left_out(self) -> list[str]:
        """What the plans do with records that make no single-task batch, as ``warning:``/``note:`` lines: a
        task with fewer usable records than a global batch trains in mixed-task batches (plan version 2) or,
        in a run begun with version 1, is never trained on; and the share of the records the first epoch's
        plan leaves out."""
        ld, src = self.loader, self.source
        counts = np.bincount(np.asarray(src.task_idx), minlength=len(src.task_names))
        files = [str(p) for p in src.paths]
        small = [f"{src.task_names[t]!r} ({int(n):,})" for t, n in enumerate(counts) if 0 < n < ld.global_batch]
        out = []
        if small and ld.plan_version >= 2:
            out.append(f"note: task(s) {', '.join(small)} of {files} have fewer usable records than a global batch "
                       f"({ld.global_batch}): they train in mixed-task batches, with the other tasks' leftovers")
        elif small:
            out.append(f"warning: task(s) {', '.join(small)} of {files} have fewer usable records than a global "
                       f"batch ({ld.global_batch}): this run's batch plans (version 1, kept since it began) draw "
                       f"batches within one task, so they are never trained on; a new run pools them")
        self.plan(0)  # at the run's start: epoch 0's plan and its stats
        dropped, mixed = self.stats.get("dropped_tail", 0), self.stats.get("mixed_batches")
        if dropped and len(src):
            why = (f"the leftovers of every task, pooled, fill {mixed} mixed batch(es); the rest, short of a "
                   f"global batch ({ld.global_batch}) or repeating a positive in every batch left, waits"
                   if mixed is not None else f"each task's shuffled tail, short of a global batch ({ld.global_batch})")
            out.append(f"{'note' if mixed is not None else 'warning'}: epoch 0's batches leave out {dropped:,} of "
                       f"{len(src):,} records ({dropped / len(src):.1%}) of {files}: {why} (other records are left "
                       f"out in other epochs)")
        return out

    def cursor(self) -> list:
        return [self.epoch, self.position]

    def next_rows(self) -> tuple[list, int]:
        while True:
            p = self.plan(self.epoch)
            if len(p) == 0:
                self.steps_per_epoch()  # the error
            if self.position < len(p):
                items = p.batch(self.position)
                self.position += 1
                recs = self.source.records([i for i, _ in items])  # checked against the files as indexed
                return [(self.base + i, r, j) for (i, j), r in zip(items, recs)], self.epoch
            self.epoch, self.position = self.epoch + 1, 0


class _StreamingStream:
    """A streaming source (``data.hf.StreamingSource``): this rank's parts, read in order."""

    def __init__(self, source, weight: float, loader: "Loader") -> None:
        self.source, self.weight, self.loader = source, weight, loader
        self.stats: dict = {"streaming": True}

    def steps_per_epoch(self) -> int:
        raise ConfigError(f"{self.source.name} is streamed (its length is unknown): set run.max_steps")

    def check(self) -> None:
        pass

    def cursor(self) -> dict:  # this rank's parts' positions (state() gathers every rank's)
        return self.source.cursor()

    def next_rows(self) -> tuple[list, int]:
        epoch = self.source.epoch
        return [(rid, rec, 0) for rid, rec in self.source.take(self.loader.local)], epoch


class Loader:
    def __init__(self, sources, collate: Callable, *, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 weights: list[float] | None = None) -> None:
        """``sources``: one source or a list (a mixture, with ``weights``; equal weights by default)."""
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources) or any(w <= 0 for w in weights):
            raise ConfigError(f"data.mixture: one positive weight per source, got {weights} for {len(sources)}")
        if global_batch % world:
            raise ConfigError(f"global batch {global_batch} does not split over {world} processes")
        self.collate, self.global_batch, self.seed = collate, global_batch, seed
        self.local = global_batch // world
        self.lo = rank * self.local
        bases = np.cumsum([0] + [len(s) for s in sources])
        self.streams = [_StreamingStream(s, w, self) if getattr(s, "streaming", False) else _Stream(s, w, int(b), self)
                        for s, w, b in zip(sources, weights, bases)]
        self.p = np.asarray(weights) / sum(weights)
        self.plan_version = PLAN_VERSION  # a resumed run keeps the one it started with (``use_plan_version``)
        self.step = 0
        self._at = self._cursor()  # where the batches handed out so far leave the loader (``ahead`` makes more)

    def _cursor(self) -> dict:
        """Where the loader stands after the batches made so far: this rank's cursors, no collective."""
        return {"step": self.step, "cursors": [s.cursor() for s in self.streams]}

    # ---- the single-source view (and what tests read) -------------------------------------------
    @property
    def source(self):
        return self.streams[0].source

    def _first(self) -> tuple[int, int]:
        """The first source's (epoch, position) after the batches handed out (not those made ahead); a
        streamed one's: its parts' lowest epoch on this rank and the rows read in it."""
        c = self._at["cursors"][0]
        if isinstance(c, dict):
            e = min(e for _, e, _ in c["state"])
            return e, sum(r for _, pe, r in c["state"] if pe == e)
        return int(c[0]), int(c[1])

    @property
    def epoch(self) -> int:
        return self._first()[0]

    @property
    def position(self) -> int:
        return self._first()[1]

    @property
    def stats(self) -> dict | list[dict]:
        return self.streams[0].stats if len(self.streams) == 1 else [s.stats for s in self.streams]

    def steps_per_epoch(self) -> int:
        """Global batches in one pass over every source (epoch 0's plans); an error when one has none
        or is streamed (unknown length)."""
        return sum(s.steps_per_epoch() for s in self.streams)

    def use_plan_version(self, version: int) -> None:
        """Plan batches as ``batching.plan`` version ``version`` did (a run resumes with the version it began with)."""
        if version != self.plan_version:
            self.plan_version = version
            for s in self.streams:
                if isinstance(s, _Stream):
                    s._plans, s.stats = {}, {}

    def check(self) -> None:
        """An error now, rather than mid-run, when an indexed source makes no global batch."""
        for s in self.streams:
            s.check()

    def left_out(self) -> list[str]:
        """What the batch plans pool and leave out of the indexed sources (``_Stream.left_out``), as lines to print."""
        return [w for s in self.streams if isinstance(s, _Stream) for w in s.left_out()]

    # ---- the cursor -----------------------------------------------------------------------------
    def state(self) -> dict:
        """The cursor after the batches handed out so far, those made ahead not counted (JSON). Collective
        when a source is streamed (each rank's shard position is gathered), so every rank calls it at the
        same point."""
        from qwen3train import dist

        cursors = [dist.all_gather_object(c) if isinstance(s, _StreamingStream) else list(c)
                   for s, c in zip(self.streams, self._at["cursors"])]
        return {"step": self._at["step"], "cursors": cursors}

    def seek(self, state: dict) -> None:
        self.step = state.get("step", 0)
        cursors = state.get("cursors")
        if cursors is None:  # a fresh start, or a checkpoint of a single-source run written before mixtures
            old = [state.get("epoch") or 0, state.get("batch_in_epoch") or 0]
            if self.step == 0 and old == [0, 0]:
                self._at = self._cursor()
                return  # a fresh start: every source at its beginning
            cursors = [old]
        if len(cursors) != len(self.streams):
            raise ConfigError(f"the checkpoint was written for {len(cursors)} data sources, this run has "
                              f"{len(self.streams)}: resume with the same data.mixture, or start a new run")
        for s, c in zip(self.streams, cursors):
            if isinstance(s, _StreamingStream):  # every rank's cursor: its parts go to this run's ranks
                s.source.seek(c)
            else:
                s.epoch, s.position = int(c[0]), int(c[1])
        self._at = self._cursor()

    def _pick(self, step: int) -> int:
        if len(self.streams) == 1:
            return 0
        return int(np.random.default_rng([self.seed, 0x6D6978, step]).choice(len(self.streams), p=self.p))

    # ---- batches --------------------------------------------------------------------------------
    def collate_items(self, items: list[tuple[int, int]], epoch: int = 0, stream: int = 0):
        """Collate given (record, positive) pairs of an indexed source (tests, tools that pick rows)."""
        s = self.streams[stream]
        return self.collate([(s.base + i, s.source[i], j) for i, j in items], epoch)

    def fingerprint(self) -> list:
        """Per source, what its ``fingerprint`` says (``IndexedSource``'s; a streamed source's name and files)."""
        return [s.source.fingerprint() for s in self.streams]

    def heaviest(self, n: int, pool: int = 8):
        """A batch of the ``n`` heaviest records of the indexed sources, heaviest first: each with its longest
        positive and its longest K negatives, weighed by their tokens as a batch holds them (truncated), among
        the ``pool * n`` (at least 64, at most ``n + 4096``) largest on disk. Size on disk alone picked records
        made large by what no batch holds (a long ``not_neg`` list, many positives, scores). None when every
        source is streamed. For the memory rehearsal (``train.memory``)."""
        m = min(max(pool * n, 64), n + 4096)
        found = sorted(((size, k, i) for k, s in enumerate(self.streams) if isinstance(s, _Stream)
                        for size, i in s.source.heaviest(m)), key=lambda t: -t[0])[:m]
        if not found:
            return None
        k_neg = getattr(self.collate, "k", 0)
        rows = []
        for _, k, i in found:
            rec = self.streams[k].source[i]
            if k_neg and len(rec.neg) > k_neg:  # the K longest: a draw of K of K takes them all (scores with them)
                at = sorted(range(len(rec.neg)), key=lambda t: len(rec.neg[t]))[-k_neg:]
                rec = dataclasses.replace(rec, neg=[rec.neg[t] for t in at], neg_scores=None if rec.neg_scores is None
                                          else [rec.neg_scores[t] for t in at])
            rows.append((self.streams[k].base + i, rec, max(range(len(rec.pos)), key=lambda j: len(rec.pos[j]))))
        weight = self.collate(rows, 0).row_tokens()  # one tokenizer call for all of them
        return self.collate([rows[t] for t in sorted(range(len(rows)), key=lambda t: -weight[t])[:n]], 0)

    def _make(self, prepare: Callable | None = None) -> tuple:
        rows, epoch = self.streams[self._pick(self.step)].next_rows()
        batch = self.collate(rows, epoch)
        if hasattr(batch, "records"):  # the batch's records, named when its step is skipped
            batch.records = rows
        self.step += 1
        if prepare is not None:
            prepare(batch)
        return batch, self._cursor()

    def __iter__(self) -> Iterator:
        """This rank's batches, forever, each made when asked."""
        while True:
            batch, self._at = self._make()
            yield batch

    def ahead(self, count: int, prepare: Callable | None = None, depth: int = 1) -> "Ahead":
        """The next ``count`` batches, ``depth`` of them made ahead on a background thread (see ``Ahead``)."""
        return Ahead(self, count, prepare, depth)


class Ahead:
    """``count`` batches of a loader, the next ones made on a background thread while the caller trains on
    the current one: records read, texts formatted and tokenized, and ``prepare(batch)`` run (the loop cuts
    and packs the micro batches there), so a GPU step does not wait for the host between steps.

    * Exactly the batches, in the order and with the cursor, of ``iter(loader)``: one thread makes them in
      turn, never more than ``count``; ``loader.state()`` counts the batches handed out, not those made
      ahead, so a checkpoint resumes at the right batch. ``depth`` 0: each made when asked, on the caller's
      thread.
    * An error making a batch (a bad record) is raised when that batch is asked for, as without the thread.
    * ``settle()`` waits until the thread is idle: the tokenizer is not safe to use from two threads at
      once, so the loop settles after each step's forward and backward, before evaluating or exporting.
    * ``wait_s``: seconds the caller spent waiting for batches (the data path's cost left in the step);
      ``make_s``: seconds spent making them (on the thread: what was taken off the step).
    """

    def __init__(self, loader: Loader, count: int, prepare: Callable | None = None, depth: int = 1) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self.count, self.prepare, self.depth = loader, count, prepare, max(0, depth)
        self.made = self.given = 0
        self.pending: deque = deque()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwen3train-data") if self.depth else None
        self.wait_s = self.make_s = 0.0

    def _make(self) -> tuple:
        t = time.perf_counter()
        try:
            return self.loader._make(self.prepare)
        finally:
            self.make_s += time.perf_counter() - t

    def _fill(self) -> None:
        while self.pool is not None and self.made < self.count and len(self.pending) < self.depth:
            self.pending.append(self.pool.submit(self._make))
            self.made += 1

    def __iter__(self) -> "Ahead":
        return self

    def __next__(self):
        if self.given >= self.count:
            raise StopIteration
        t = time.perf_counter()
        if self.pool is None:
            batch, at = self._make()
            self.made += 1
        else:
            self._fill()
            batch, at = self.pending.popleft().result()
        self.wait_s += time.perf_counter() - t
        self.loader._at = at
        self.given += 1
        self._fill()  # the next batch, made while the caller trains on this one
        return batch

    def settle(self) -> None:
        if self.pending:
            from concurrent.futures import wait

            t = time.perf_counter()
            wait(self.pending)
            self.wait_s += time.perf_counter() - t

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "Ahead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
