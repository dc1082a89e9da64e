"""The checksums a checkpoint save takes: before (rank 0 hashed every file on one thread, the export's weights twice)
vs now (the export's digests reused, files hashed on threads, and every rank hashing a share); and the check of them
when a run resumes (before: rank 0 alone, one thread; now: ``verify_together``).

    .venv/bin/python bench/bench_manifest.py CHECKPOINT [--rounds 3] [--procs 2]

CHECKPOINT: a saved checkpoint folder (``<run>/checkpoints/step_N``, with ``model/``). Its files are read once first
(a save hashes what it just wrote: the page cache holds it). Per round, in one process: ``before`` (one thread: the
export's files, then every file) and ``now, 1 process`` (``hash_together`` with no group); then ``now, N processes``
(``hash_together`` in N gloo processes, timed from the barrier before it). Median seconds; every variant's manifest
must equal the one-thread hash of every file (else it stops). Then the same for the resume's check of the folder's
own manifest (``verify``: one thread before, threads now, ``verify_together`` in N processes), which must find
nothing wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _before(folder: Path) -> dict:
    from qwen3train import integrity

    threads, integrity.HASH_THREADS = integrity.HASH_THREADS, 1
    try:
        model = folder / "model"
        integrity.entries(model, list(integrity.listing(model)))  # write_manifest(tmp / "model")
        return integrity.entries(folder, list(integrity.listing(folder)))  # write_manifest(tmp): all of it again
    finally:
        integrity.HASH_THREADS = threads


def _now(folder: Path) -> dict:
    from qwen3train.train.checkpoint import hash_together

    return hash_together(folder)


def _verify_before(folder: Path) -> list:
    from qwen3train import integrity

    threads, integrity.HASH_THREADS = integrity.HASH_THREADS, 1
    try:
        return integrity.verify(folder)
    finally:
        integrity.HASH_THREADS = threads


def _verify_now(folder: Path) -> list:
    from qwen3train.train.checkpoint import verify_together

    return verify_together(folder)


def worker(folder: Path, rounds: int) -> None:
    """One of N processes (torch.distributed.run): ``hash_together`` timed from a barrier, rank 0 prints."""
    from qwen3train import dist

    dist.init()
    times, checks, files = [], [], None
    for _ in range(rounds):
        for fn, into in ((_now, times), (_verify_now, checks)):
            dist.barrier()
            t = time.perf_counter()
            got = fn(folder)
            dist.barrier()
            into.append(time.perf_counter() - t)
            if fn is _now:
                files = got
            else:
                assert got == [], got
    if dist.is_main():
        print(json.dumps({"times": times, "checks": checks, "files": files}))
    dist.cleanup()


def main(folder: Path, rounds: int, procs: int) -> None:
    from qwen3train import integrity

    sizes = integrity.listing(folder)
    truth = integrity.entries(folder, list(sizes))  # also fills the page cache
    export = sum(n for r, n in sizes.items() if r.startswith("model/"))
    print(f"{folder}: {len(sizes)} files, {sum(sizes.values()) / 2**30:.2f} GiB "
          f"(largest {max(sizes.values()) / 2**30:.2f} GiB; export {export / 2**30:.2f} GiB)")
    got = {"before": [], "now, 1 process": [], "verify before": [], "verify now, 1 process": []}
    for _ in range(rounds):
        for name, fn in (("before", _before), ("now, 1 process", _now), ("verify before", _verify_before),
                         ("verify now, 1 process", _verify_now)):
            t = time.perf_counter()
            files = fn(folder)
            got[name].append(time.perf_counter() - t)
            assert files == (truth if name in ("before", "now, 1 process") else []), name
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(procs), __file__, str(folder), "--worker", "--rounds", str(rounds)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not line:
        sys.exit(proc.stdout[-2000:] + proc.stderr[-2000:])
    out = json.loads(line[-1])
    assert out["files"] == truth, f"{procs} processes"
    got[f"now, {procs} processes"] = out["times"]
    got[f"verify now, {procs} processes"] = out["checks"]
    print("| variant | median s | rounds (s) | before / variant |\n|---|---|---|---|")
    for name, ts in got.items():
        base = statistics.median(got["verify before" if name.startswith("verify") else "before"])
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {', '.join(f'{t:.3f}' for t in ts)} | {base / m:.2f}x |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    (worker if a.worker else lambda f, r: main(f, r, a.procs))(a.folder, a.rounds)
