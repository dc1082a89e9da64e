"""Sharded training on CPU: engine=fsdp (torch's FSDP2) against DeepSpeed ZeRO-3 (the sharded engine a user would
otherwise pick) and ZeRO-2 / DDP, two gloo processes each, the same model, data, batches and steps.

    .venv/bin/python bench/bench_fsdp.py              # SmolLM2-135M (make smollm2), ~6 min on 2 cores
    .venv/bin/python bench/bench_fsdp.py --quick      # the tiny Qwen3, a smoke
    .venv/bin/python bench/bench_fsdp.py --load       # rank 0 alone reads the weights, or every rank: host memory
                                                      # per rank (engine.fsdp_load; ZeRO-3: engine.zero3_init)

Per engine: the median step time after two warm-up steps, the peak resident memory of the larger rank (rank 0
loads the whole model before it is sharded, so the peak includes that load), the losses, and the largest
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
# name -> overrides; fsdp-keep: each layer keeps its gathered weights from forward to backward
VARIANTS = {"torch": ["engine=torch"], "fsdp": ["engine=fsdp"],
            "fsdp-keep": ["engine=fsdp", "engine.fsdp_reshard_after_forward=false"], "zero3": ["engine=zero3"],
            "zero2": ["engine=zero2"]}
ENGINES = tuple(VARIANTS)
# run as a process of its own: the peak resident memory of its largest descendant (a rank) is its children's
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(rc)")


def one(engine: str, model: Path, data: Path, out: Path, steps: int, batch: int, micro: int) -> dict:
    run_dir = out / engine
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "qwen3train.cli.main", "--config-name=stage1", *VARIANTS[engine],
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


# --load: engine -> (how its line starts, the overrides of each way of loading: every rank reads, rank 0 alone)
LOADS = {"fsdp": ("engine=fsdp: ", {"every_rank": ["engine.fsdp_load=every_rank"], "rank0": ["engine.fsdp_load=rank0"]}),
         "zero3": ("engine=zero3: ", {"every_rank": ["engine.zero3_init=false"], "rank0": ["engine.zero3_init=true"]})}


def load_peaks(engine: str, mode: str, nproc: int, model: Path, data: Path, out: Path) -> list[int]:
    """Each rank's host memory peak once the model is sharded and its weights in place (the engine's own line); for
    ZeRO-3 the peak with the model built, before ``deepspeed.initialize``, whose buffers (the fp32 partitions, the
    gradient buckets) live on the GPU in a real run and in host memory only here."""
    start, modes = LOADS[engine]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           "qwen3train.cli.main", "--config-name=stage1", f"engine={engine}", *modes[mode],
           "engine.precision=fp32", f"engine.micro_batch_size={nproc}", f"engine.global_batch_size={2 * nproc}",
           "run.max_steps=1", "run.save_every=0", "run.resume=never",
           f"run.output_dir={out / f'{engine}-{mode}{nproc}'}", f"model.name_or_path={model}",
           "model.max_query_length=32", "model.max_doc_length=64", f"data.train_files=[{data}]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} {mode}: status {proc.returncode}\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(start))
    peaks = line.split("MB: ")[1].rstrip(")")
    if "; with the model built" in peaks:  # ZeRO-3: the peak before DeepSpeed's own allocations (on the CPU, host)
        peaks = peaks.split(": ")[-1]
    return json.loads(peaks)


def bf16_copy(model: Path, out: Path) -> Path:
    """The model saved in bf16, as the released Qwen3 checkpoints are: training loads float32 masters from it, so
    every process that reads it converts it into memory of its own (an fp32 file is memory-mapped instead, its
    pages shared between the processes and counted in each one's resident memory)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    dst = out / f"{model.name}-bf16"
    if not (dst / "config.json").exists():
        AutoModel.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(dst)
        AutoTokenizer.from_pretrained(model).save_pretrained(dst)
    return dst


def main_load(model: Path, data: Path, out: Path, engines) -> int:
    model = bf16_copy(model, out)
    print(f"\n{model.name} (bf16 file, fp32 masters), host memory peak per rank (MB) after the weights are in "
          f"place\n")
    print("| engine | processes | loaded by | rank 0 | each other rank (max) | all ranks | vs every rank |")
    print("|---|---|---|---|---|---|---|")
    for engine in [e for e in LOADS if e in engines]:
        for nproc in (2, 4):
            got = {m: load_peaks(engine, m, nproc, model, data, out) for m in LOADS[engine][1]}
            for mode, peaks in got.items():
                print(f"| {engine} | {nproc} | {mode} | {peaks[0]:,} | {max(peaks[1:]):,} | {sum(peaks):,} | "
                      f"{sum(peaks) / sum(got['every_rank']):.2f} |", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES), help="a comma-separated subset of " + ",".join(ENGINES))
    ap.add_argument("--load", action="store_true", help="host memory of the two ways of loading, 2 and 4 processes "
                    "(the engines among --engines: fsdp, zero3)")
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
    if args.load:
        return main_load(model, data, out, args.engines.split(","))
    engines = tuple(e for e in ENGINES if e in args.engines.split(","))
    got: dict[str, list] = {e: [] for e in engines}
    for r in range(args.repeats):
        for engine in (engines if r % 2 == 0 else engines[::-1]):
            got[engine].append(one(engine, model, data, out / f"r{r}", steps, batch, micro))
            print(engine, r, got[engine][-1]["step_s"], got[engine][-1]["peak_mb"], flush=True)
    ref = got["torch"][0]["losses"]
    print(f"\n{model.name}, 2 processes (gloo), fp32, GradCache, global batch {batch} in micro batches of {micro}, "
          f"{steps} steps, {args.repeats} repeats (medians)\n")
    print("| engine | step s | vs DDP | vs ZeRO-3 | peak MB (larger rank) | vs DDP | largest loss difference from DDP |")
    print("|---|---|---|---|---|---|---|")
    med = {e: (statistics.median(x["step_s"] for x in got[e]), statistics.median(x["peak_mb"] for x in got[e]))
           for e in engines}
    for e in engines:
        diff = max(abs(a - b) for x in got[e] for a, b in zip(ref, x["losses"]))
        z3 = f"{med['zero3'][0] / med[e][0]:.2f}x" if "zero3" in med else "-"
        print(f"| {e} | {med[e][0]:.2f} | {med['torch'][0] / med[e][0]:.2f}x | {z3} | "
              f"{med[e][1]:,.0f} | {med[e][1] / med['torch'][1]:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
