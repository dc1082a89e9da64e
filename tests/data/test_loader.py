"""The loader: mixing sources by weight with single-task batches, a cursor that resumes exactly,
and each rank reading only its columns of the global batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen3train.data.loader import Loader
from qwen3train.data.sources import IndexedSource
from qwen3train.errors import ConfigError


def source(tmp_path, name, n, task):
    p = tmp_path / f"{name}.jsonl"
    p.write_text("".join(json.dumps({"query": f"{name}{i}", "pos": [f"{name}-p{i}"], "task": task}) + "\n"
                         for i in range(n)))
    return IndexedSource([p])


def ids(rows, epoch):
    return [(i, r.task, r.query) for i, r, _ in rows]


def test_mixture_follows_the_weights_with_single_task_batches(tmp_path):
    a, b = source(tmp_path, "a", 40, "A"), source(tmp_path, "b", 40, "B")
    ld = Loader([a, b], ids, global_batch=4, seed=3, weights=[3.0, 1.0])
    batches = [next(it) for it in [iter(ld)] for _ in range(800)]
    tasks = [{t for _, t, _ in b} for b in batches]
    assert all(len(t) == 1 for t in tasks)
    share = np.mean([t == {"A"} for t in tasks])
    assert abs(share - 0.75) < 0.05  # 0.5 (equal) or 1.0 (first source only) would fail
    # record ids of the second source are offset: negative sampling seeds never collide across sources
    assert min(i for b in batches for i, t, _ in b if t == "B") >= 40
    with pytest.raises(ConfigError, match="positive weight"):
        Loader([a, b], ids, global_batch=4, seed=3, weights=[1.0, 0.0])


def test_cursor_resumes_the_same_sequence(tmp_path):
    a, b = source(tmp_path, "a", 24, "A"), source(tmp_path, "b", 12, "B")
    whole = Loader([a, b], ids, global_batch=4, seed=1, weights=[1.0, 1.0])
    it = iter(whole)
    ref = [next(it) for _ in range(30)]
    first = Loader([a, b], ids, global_batch=4, seed=1, weights=[1.0, 1.0])
    it = iter(first)
    for _ in range(13):
        next(it)
    state = json.loads(json.dumps(first.state()))  # through a checkpoint's JSON
    again = Loader([a, b], ids, global_batch=4, seed=1, weights=[1.0, 1.0])
    again.seek(state)
    it = iter(again)
    assert [next(it) for _ in range(17)] == ref[13:]
    assert max(s[0] for s in again.state()["cursors"]) >= 2  # epochs were crossed
    with pytest.raises(ConfigError, match="2 data sources"):
        Loader([a], ids, global_batch=4, seed=1).seek(state)


def test_ranks_take_their_columns_of_the_same_global_batch(tmp_path):
    a = source(tmp_path, "a", 32, "A")
    one = iter(Loader(a, ids, global_batch=8, seed=0))
    r0 = iter(Loader(a, ids, global_batch=8, seed=0, rank=0, world=2))
    r1 = iter(Loader(a, ids, global_batch=8, seed=0, rank=1, world=2))
    for _ in range(6):
        assert next(one) == next(r0) + next(r1)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_batches_made_ahead_are_the_batches_made_in_turn(tmp_path, depth):
    """``Loader.ahead`` (the loop's data thread) hands out the batches of ``iter(loader)`` with the cursor of
    the batches handed out. Would catch: a batch made ahead counted in ``state()`` (a resume would skip it),
    more batches made than asked (records read past the run's end), another order, batches not made ahead
    on the data thread, and ``prepare`` skipped."""
    import threading

    a, b = source(tmp_path, "a", 24, "A"), source(tmp_path, "b", 12, "B")
    ref_ld = Loader([a, b], ids, global_batch=4, seed=1, weights=[1.0, 1.0])
    it = iter(ref_ld)
    ref, states = [], []
    for _ in range(10):
        ref.append(next(it))
        states.append(ref_ld.state())
    threads, second = [], threading.Event()

    def made(rows, epoch):
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            second.set()
        return ids(rows, epoch)

    ld = Loader([a, b], made, global_batch=4, seed=1, weights=[1.0, 1.0])
    prepared = []
    with ld.ahead(10, prepare=prepared.append, depth=depth) as ahead:
        for k, batch in enumerate(ahead):
            if k == 0 and depth:
                assert second.wait(10)  # the next batch is made while the caller holds this one
            assert batch == ref[k] and ld.state() == states[k] and ld.epoch == states[k]["cursors"][0][0]
            if k == 4:
                ahead.settle()
                assert len(threads) == 5 + depth  # made ahead, never more than depth
    assert len(threads) == ld.step == 10 and prepared == ref
    assert all(t.startswith("qwen3train-data") for t in threads) if depth else set(threads) == {"MainThread"}


def test_an_error_making_a_batch_ahead_surfaces_at_that_batch(tmp_path):
    """A bad record met while the data thread makes batch 3 is raised when batch 3 is asked for: batches 1 and
    2 are trained on first (as without the thread), and the error is not lost in the thread."""
    from qwen3train.data.records import DataError

    made = []

    def collate(rows, epoch):
        made.append(1)
        if len(made) == 3:
            raise DataError("x.jsonl:7", "pos", "expected a list of strings")
        return ids(rows, epoch)

    ld = Loader(source(tmp_path, "a", 24, "A"), collate, global_batch=4, seed=0)
    got = []
    with pytest.raises(DataError, match="x.jsonl:7"):
        with ld.ahead(5) as ahead:
            for batch in ahead:
                got.append(batch)
    assert len(got) == 2 and ld.state()["cursors"] == [[0, 2]]
