"""What the memory benchmarks share: each variant's process run from scratch, the variants alternating, the
figures' medians, the result printed and written to ``outputs/bench/<name>.json``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_alternating(script: str, variants: list[str], args, repeats: int) -> dict[str, list[dict]]:
    """``python -c script *args(variant)`` for each variant in turn, ``repeats`` rounds; each run's last stdout line
    is its JSON result."""
    got: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            out = subprocess.run([sys.executable, "-c", script, *args(variant)], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout
            got[variant].append(json.loads(out.strip().splitlines()[-1]))
    return got


def summarise(got: dict[str, list[dict]], keys: tuple[str, ...]) -> dict:
    """The runs, whether every run gave the same output (``digest``), and each variant's median of each key."""
    return {"runs": got, "same_output": len({r["digest"] for runs in got.values() for r in runs}) == 1,
            **{f"{v}_{k}": statistics.median(r[k] for r in runs) for v, runs in got.items() for k in keys}}


def save(name: str, res: dict) -> None:
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    out = REPO / "outputs" / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
