"""Host memory over a long training run: does anything creep up step after step (a data path, a cache without a
bound, the checkpoint writer, the dev evaluation) until the node's out-of-memory killer ends the run?

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_long_run.py [--steps 3000] [--out outputs/bench/long_run]

Stage 1 on the tiny Qwen3 (real tokenizer), GradCache, the demo pairs with their hard negatives over many epochs, a
save every 100 steps in the background (the last 2 kept), a dev evaluation every 100 steps. Reads ``host_rss_gib``
from metrics.jsonl (rank 0's resident memory at each step) and fits a line to the second half of the run: the
slope in MiB per 1,000 steps is what a leak would show."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="outputs/bench/long_run")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = REPO / "outputs" / "data"
    if not (data / "train_hn.jsonl").exists():
        from qwen3train.data.demo import build

        build(data)
    dev = out / "dev.jsonl"  # cut from the training pairs (the held-out pairs stay for evaluation)
    dev.write_text("".join((data / "train_pairs.jsonl").read_text().splitlines(keepends=True)[:40]))
    model = REPO / "outputs" / "models" / "tiny-qwen3"
    cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", f"model.name_or_path={model}",
           f"data.train_files=[{data / 'train_hn.jsonl'}]", "data.num_hard_negatives=1", "engine.micro_batch_size=8",
           "engine.global_batch_size=16", "engine.grad_cache=true", "model.max_query_length=32",
           "model.max_doc_length=64", f"run.max_steps={args.steps}", "run.save_every=100", "run.keep_last=2",
           "run.save_in_background=true", "run.eval_every=100", f"run.eval_file={dev}", f"run.output_dir={out / 'run'}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    rss = [r["host_rss_gib"] * 1024 for r in rows]
    half = len(rows) // 2
    res = {"steps": len(rows), "wall_s": round(wall, 1), "rss_mib_at_step_100": round(rss[min(99, len(rss) - 1)]),
           "rss_mib_at_half": round(rss[half]), "rss_mib_at_end": round(rss[-1]), "rss_mib_max": round(max(rss)),
           "slope_mib_per_1000_steps_second_half": round(1000 * slope(steps[half:], rss[half:]), 2),
           "rss_mib_median_by_500_steps": [round(statistics.median(rss[i:i + 500])) for i in range(0, len(rss), 500)],
           "saves": args.steps // 100, "dev_evaluations": args.steps // 100}
    (out / "bench_long_run.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
