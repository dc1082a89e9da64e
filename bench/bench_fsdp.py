"""Sharded training on CPU: engine=fsdp (torch's FSDP2) against DeepSpeed ZeRO-3 (the sharded engine a user would
otherwise pick) and ZeRO-2 / DDP, two gloo processes each, the same model, data, batches and steps.

    .venv/bin/python bench/bench_fsdp.py              # SmolLM2-135M (make smollm2), ~6 min on 2 cores
    .venv/bin/python bench/bench_fsdp.py --quick      # the tiny Qwen3, a smoke

Per engine: the median step time after two warm-up steps, the peak resident memory of the larger rank (the whole
model is loaded on each rank before it is sharded, so the peak includes that load), the losses, and the largest
difference of the losses from the DDP run (fp32: the engines compute the same steps). Engines alternate over the
repeats; medians are kept. Ratios matter, not absolute times (2 shared cores)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("torch", "fsdp", "zero3", "zero2")
# run as a process of its own: the peak resident memory of its largest descendant (a rank) is its children's
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(rc)")


def one(engine: str, model: Path, data: Path, out: Path, steps: int, batch: int, micro: int) -> dict:
    run_dir = out / engine
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "qwen3train.cli.main", "--config-name=stage1", f"engine={engine}",
           "engine.precision=fp32", "engine.grad_cache=true", f"engine.micro_batch_size={micro}",
           f"engine.global_batch_size={batch}", f"run.max_steps={steps}", "run.save_every=0", "run.resume=never",
           f"run.output_dir={run_dir}", f"model.name_or_path={model}", "model.max_query_length=48",
           "model.max_doc_length=128", f"data.train_files=[{data}]", "optim.lr=1e-4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: status {proc.returncode}\n{proc.stderr[-3000:]}")
    peak = float(next(x for x in proc.stdout.splitlines() if x.startswith("PEAK_MB")).split()[1])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": statistics.median(r["step_time_s"] for r in rows[2:]), "peak_mb": peak,
            "losses": [r["loss"] for r in rows]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from qwen3train.data.demo import build

    out = REPO / "outputs" / "bench" / "fsdp"
    data = out / "data" / "train_pairs.jsonl"
    if not data.exists():
        build(out / "data")
    if args.quick:
        from qwen3train.models.tiny import make_tiny_qwen3

        model, steps, batch, micro = make_tiny_qwen3(out / "tiny"), 4, 8, 2
    else:
        model, steps, batch, micro = REPO / "outputs" / "models" / "smollm2-135m-instruct", 6, 16, 4
        if not (model / "config.json").exists():
            raise SystemExit(f"{model} is missing: run `make smollm2` first")
    got: dict[str, list] = {e: [] for e in ENGINES}
    for r in range(args.repeats):
        for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
            got[engine].append(one(engine, model, data, out / f"r{r}", steps, batch, micro))
            print(engine, r, got[engine][-1]["step_s"], got[engine][-1]["peak_mb"], flush=True)
    ref = got["torch"][0]["losses"]
    print(f"\n{model.name}, 2 processes (gloo), fp32, GradCache, global batch {batch} in micro batches of {micro}, "
          f"{steps} steps, {args.repeats} repeats (medians)\n")
    print("| engine | step s | vs DDP | vs ZeRO-3 | peak MB (larger rank) | vs DDP | largest loss difference from DDP |")
    print("|---|---|---|---|---|---|---|")
    med = {e: (statistics.median(x["step_s"] for x in got[e]), statistics.median(x["peak_mb"] for x in got[e]))
           for e in ENGINES}
    for e in ENGINES:
        diff = max(abs(a - b) for x in got[e] for a, b in zip(ref, x["losses"]))
        print(f"| {e} | {med[e][0]:.2f} | {med['torch'][0] / med[e][0]:.2f}x | {med['zero3'][0] / med[e][0]:.2f}x | "
              f"{med[e][1]:,.0f} | {med[e][1] / med['torch'][1]:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
