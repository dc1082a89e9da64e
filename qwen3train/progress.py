"""Progress of the long loops (encoding, filtering, mining, merging, BM25, MTEB): one helper.

On a terminal a bar with items/s and an ETA (tqdm, on stderr); elsewhere (a log file, CI, a pipeline
stage's captured output) quiet: one line when the loop ends, ``<desc>: <n> <unit> in <s> s (<rate>/s)``.
``QWEN3TRAIN_PROGRESS=bar|line|off`` forces a mode. Only rank 0 shows anything; on every rank an update
re-arms the job's stall report (``qwen3train.stall``).
"""

from __future__ import annotations

import os
import sys
import time

from qwen3train import stall


def mode() -> str:
    forced = os.environ.get("QWEN3TRAIN_PROGRESS")
    if forced in ("bar", "line", "off"):
        return forced
    return "bar" if sys.stderr.isatty() else "line"


class Progress:
    """``with Progress(total, "encode stage1", "texts") as p: ... p.update(n)``; ``desc=None``: silent."""

    def __init__(self, total: int | None, desc: str | None, unit: str = "it", min_seconds: float = 2.0) -> None:
        from qwen3train import dist

        self.desc, self.unit, self.total, self.n = desc, unit, total, 0
        self.min_seconds = min_seconds
        self.mode = "off" if desc is None or not dist.is_main() else mode()
        self.t0 = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr,
                            mininterval=0.5)

    def update(self, n: int = 1) -> None:
        self.n += n
        stall.beat()  # on every rank: a job that moves is not stalled (qwen3train/stall.py)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode != "off" and elapsed >= self.min_seconds:  # one line per finished loop, bar or not
            rate = self.n / elapsed if elapsed > 0 else 0.0
            print(f"{self.desc}: {self.n:,} {self.unit} in {elapsed:.0f} s ({rate:,.1f}/s)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
