"""The memory rehearsal's one-time cost (``engine.rehearse_memory``, ``qwen3train/train/memory.py``), in steps.

    .venv/bin/python bench/bench_rehearsal.py [--repeats 2] [--steps 6]

Stage 2 of SmolLM2-135M-Instruct (``make smollm2``) on the demo's hard-negative pairs (``make demo-data``:
documents up to 256 tokens, 3 negatives), GradCache in chunks of 4 rows, on the CPU: runs with and without the
rehearsal, alternating, each a fresh process. The rehearsal's cost = the difference of the runs' wall times,
and the same over the median step time (the rehearsal is one step, on the heaviest micro batch the data can
make, plus reading those records). Writes ``outputs/bench/rehearsal.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(out: Path, rehearse: bool, steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage2", "model=smollm2-135m",
           "model.init_from=null", f"data.train_files=[{REPO / 'outputs' / 'data' / 'train_hn.jsonl'}]",
           "data.num_hard_negatives=3", "engine.global_batch_size=16", "engine.micro_batch_size=4",
           "engine.grad_cache=true", f"engine.rehearse_memory={str(rehearse).lower()}", f"run.max_steps={steps}",
           "run.save_every=0", "run.eval_every=0", f"run.output_dir={out}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("memory rehearsal")), None)
    return {"wall_s": wall, "step_s": statistics.median(r["step_time_s"] for r in rows[1:]),
            "tokens_per_step": statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in rows),
            "losses": [r["loss"] for r in rows], "line": line}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    out = REPO / "outputs" / "bench" / "rehearsal"
    runs: dict[str, list] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            runs[mode].append(one(out / mode, mode == "on", args.steps))
    off = statistics.median(r["wall_s"] for r in runs["off"])
    on = statistics.median(r["wall_s"] for r in runs["on"])
    step = statistics.median(r["step_s"] for r in runs["off"] + runs["on"])
    heavy = re.search(r"\((\d+) rows, ([\d,]+) tokens", runs["on"][0]["line"] or "")
    res = {"wall_off_s": round(off, 1), "wall_on_s": round(on, 1), "rehearsal_s": round(on - off, 1),
           "median_step_s": round(step, 2), "rehearsal_in_steps": round((on - off) / step, 2),
           "rehearsal_line": runs["on"][0]["line"],
           "heaviest_micro_batch_tokens": int(heavy.group(2).replace(",", "")) if heavy else None,
           "median_step_tokens": round(statistics.median(r["tokens_per_step"] for r in runs["off"])),
           "same_losses": all(a["losses"] == b["losses"] for a, b in zip(runs["off"], runs["on"]))}
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "rehearsal.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
