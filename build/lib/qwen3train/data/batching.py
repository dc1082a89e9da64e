"""Batch plans: single-task global batches without duplicate positives, deterministic per epoch.

The plan for epoch e is a pure function of (source index, global batch, seed, e): every rank
computes the same plan and reads only its own slice, and a resumed run recomputes it and skips to
the saved position, so resume is exact.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def plan_epoch(source, global_batch: int, seed: int, epoch: int) -> tuple[list[list[tuple[int, int]]], dict]:
    """Return (batches, stats). A batch is a list of (record index, positive index) of length
    ``global_batch``, all from one task, with pairwise-distinct positive texts.

    A record whose chosen positive already sits in the batch being filled waits for the next batch
    of its task; per task, the final incomplete batch is dropped (counted in ``stats``).
    """
    rng = np.random.default_rng([seed, epoch])
    by_task: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(source.task_idx):
        by_task[t].append(i)
    batches: list[list[tuple[int, int]]] = []
    stats = {"dropped_tail": 0, "deferred_duplicates": 0}
    for t in sorted(by_task):
        order = rng.permutation(np.asarray(by_task[t], dtype=np.int64))
        current: list[tuple[int, int]] = []
        seen: set[int] = set()
        waiting: list[tuple[int, int]] = []
        for i in order.tolist():
            j = int(rng.integers(source.num_pos(i)))
            item = (i, j)
            candidates = waiting + [item]
            waiting = []
            for it in candidates:
                h = source.positive_hash(*it)
                if h in seen:
                    waiting.append(it)
                    stats["deferred_duplicates"] += 1
                    continue
                current.append(it)
                seen.add(h)
                if len(current) == global_batch:
                    batches.append(current)
                    current, seen = [], set()
        stats["dropped_tail"] += len(current) + len(waiting)
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm], stats
