"""Fuzz the record index: many random corruptions of good JSONL files, the block path against the record
parser (``qwen3train/data/fuzz.py``; ``make test`` runs 1,000 with one seed).

    .venv/bin/python bench/fuzz_data.py [--files 20000] [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qwen3train.data.fuzz import run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000, help="corrupted files per seed")
    ap.add_argument("--seeds", type=int, default=4)
    a = ap.parse_args()
    total = {"files": 0, "with_rejects": 0, "disagreements": []}
    t = time.perf_counter()
    for seed in range(a.seeds):
        with tempfile.TemporaryDirectory() as d:
            r = run(a.files, seed, Path(d), records=120 + 40 * seed, block_bytes=1024 << seed)
        total["files"] += r["files"]
        total["with_rejects"] += r["with_rejects"]
        total["disagreements"] += [dict(x, seed=seed) for x in r["disagreements"]]
        print(json.dumps({"seed": seed, "files": r["files"], "with_rejects": r["with_rejects"],
                          "disagreements": len(r["disagreements"])}), flush=True)
    total["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(total))


if __name__ == "__main__":
    main()
