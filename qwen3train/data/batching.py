"""Batch plans: single-task global batches without duplicate positives, deterministic per epoch.

The plan for epoch e is a pure function of (source index, global batch, seed, e): every rank
computes the same plan and keeps only its own slice, and a resumed run recomputes it and skips to
the saved position, so resume is exact.

Vectorised (numpy) over the index, so planning 150M records costs seconds and a few bytes per record,
not a Python object per record: per task, the records are permuted and each draws one of its
positives; the sequence is cut into batches, and a record whose positive already sits earlier in its
batch moves to the end of the task's sequence (counted as deferred); this repeats until every full
batch is duplicate-free. Plan version 2 (the default since 2026-12-05): what that leaves of every task (its
incomplete last batch, duplicates that found no place, a whole task smaller than a global batch) is pooled,
shuffled and cut into mixed-task batches the same way, so a small task is trained on and only the pool's own
tail (< one global batch) and its unplaceable duplicates are left out of the epoch (counted); and a duplicate
moves behind a task's tail, not in front of it, so the tail fills batches. Version 1 dropped every task's
leftovers (a task smaller than a global batch was never trained on) and kept a duplicate in the last full batch
cycling there until the batch was dropped. A run keeps the version it started with (``train_state.json``;
checkpoints without one are version 1), so a resume is exact across the change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ROUNDS = 64
PLAN_VERSION = 2


@dataclass
class Plan:
    """``idx[b, c]``: record of column c in global batch b; ``pos[b, c]``: which of its positives."""

    idx: np.ndarray  # int64 [batches, global_batch]
    pos: np.ndarray  # int32 [batches, global_batch]
    stats: dict

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, b: int, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Batch ``b`` (columns ``lo:hi``: a rank's share) as (record, positive) pairs."""
        return list(zip(self.idx[b, lo:hi].tolist(), self.pos[b, lo:hi].tolist()))

    def columns(self, lo: int, hi: int) -> "Plan":
        """Only columns ``lo:hi`` (a rank's share), copied: the full plan can be freed."""
        return Plan(self.idx[:, lo:hi].copy(), self.pos[:, lo:hi].copy(), self.stats)


def _dedup(h: np.ndarray, batch: int, to_end: bool = False) -> tuple[np.ndarray, int]:
    """Order (a permutation of range(len(h))) whose full batches hold distinct values; and moves made. A later
    copy of a value moves behind the full batches (version 1: the incomplete tail stays where it is, so a
    copy in the last full batch can only move within it) or, ``to_end`` (version 2), behind the tail too, so
    the tail's records move up and fill the batches."""
    order = np.arange(len(h))
    moved = 0
    for _ in range(MAX_ROUNDS):
        full = len(order) // batch * batch
        if full == 0:
            break
        hb = h[order[:full]].reshape(-1, batch)
        o = np.argsort(hb, axis=1, kind="stable")
        s = np.take_along_axis(hb, o, axis=1)
        dup = np.zeros_like(hb, dtype=bool)
        np.put_along_axis(dup, o[:, 1:], s[:, 1:] == s[:, :-1], axis=1)  # later copies of a value
        if not dup.any():
            break
        flat = dup.reshape(-1)
        moved += int(flat.sum())
        if to_end:
            order = np.concatenate([order[:full][~flat], order[full:], order[:full][flat]])
        else:
            order = np.concatenate([order[:full][~flat], order[:full][flat], order[full:]])
    return order, moved


def _full_batches(h: np.ndarray, global_batch: int, stats: dict, version: int) -> np.ndarray:
    """Positions (into ``h``) of the duplicate-free full batches, batch after batch (``_dedup``'s order);
    batches still holding a duplicate when its rounds are exhausted are dropped, never trained on."""
    keep, moved = _dedup(h, global_batch, to_end=version >= 2)
    stats["deferred_duplicates"] += moved
    full = len(keep) // global_batch * global_batch
    kept = keep[:full]
    if full:
        sb = np.sort(h[kept].reshape(-1, global_batch), axis=1)
        ok = ~(sb[:, 1:] == sb[:, :-1]).any(axis=1)
        kept = kept.reshape(-1, global_batch)[ok].reshape(-1)
    return kept


def plan(source, global_batch: int, seed: int, epoch: int, version: int = PLAN_VERSION) -> Plan:
    rng = np.random.default_rng([seed, epoch])
    tasks = np.asarray(source.task_idx)
    stats = {"dropped_tail": 0, "deferred_duplicates": 0}
    idx_parts, pos_parts, rest = [], [], []
    for t in np.unique(tasks):
        members = np.flatnonzero(tasks == t)
        order = rng.permutation(members)
        j = (rng.random(len(order)) * source.num_pos_of(order)).astype(np.int64)
        h = source.positive_hashes(order, j)
        kept = _full_batches(h, global_batch, stats, version)
        if version >= 2:  # the task's leftovers go to the mixed pool
            left = np.setdiff1d(np.arange(len(order)), kept, assume_unique=True)
            rest.append((order[left], j[left], h[left]))
        else:
            stats["dropped_tail"] += len(order) - len(kept)
        idx_parts.append(order[kept].reshape(-1, global_batch))
        pos_parts.append(j[kept].reshape(-1, global_batch).astype(np.int32))
    if version >= 2:
        order, j, h = (np.concatenate([r[k] for r in rest]) if rest else np.zeros(0, np.int64) for k in range(3))
        mix = rng.permutation(len(order))
        order, j, h = order[mix], j[mix], h[mix]
        kept = _full_batches(h, global_batch, stats, version)
        stats["dropped_tail"] += len(order) - len(kept)
        stats["mixed_batches"] = len(kept) // global_batch
        idx_parts.append(order[kept].reshape(-1, global_batch))
        pos_parts.append(j[kept].reshape(-1, global_batch).astype(np.int32))
    idx = np.concatenate(idx_parts) if idx_parts else np.zeros((0, global_batch), np.int64)
    pos = np.concatenate(pos_parts) if pos_parts else np.zeros((0, global_batch), np.int32)
    perm = rng.permutation(len(idx))
    return Plan(idx[perm], pos[perm], stats)


def plan_epoch(source, global_batch: int, seed: int, epoch: int,
               version: int = PLAN_VERSION) -> tuple[list[list[tuple[int, int]]], dict]:
    """The plan as lists of (record, positive) pairs (small sources, tests)."""
    p = plan(source, global_batch, seed, epoch, version)
    return [p.batch(b) for b in range(len(p))], p.stats
