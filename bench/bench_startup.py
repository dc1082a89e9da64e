"""A stage process's start, this tree against another checkout, alternating: wall, CPU and the cycle collector's
time in each stage of the smoke pipeline run alone as a process (as the pipeline runs it).

    git worktree add /tmp/before <commit>
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_startup.py --before /tmp/before [--runs 3]
        [--stages filter,stage1,eval] [--pipeline] [--out outputs/bench/startup]

Runs the smoke pipeline once with this tree (tiny Qwen3 as backbone and generator, the demo data), then each stage
again from its resolved config (``configs/resolved_<stage>.yaml``), its output removed first, with the working
directory in one tree or the other (``python -m`` imports the package of the working directory), alternating.
A probe imported first (``sitecustomize`` on PYTHONPATH) sums the collector's passes and seconds
(``gc.callbacks``). ``--pipeline`` also times the whole smoke pipeline in each tree, alternating."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """import atexit, gc, json, os, time
acc = {"passes": 0, "seconds": 0.0}
t0 = [0.0]
def cb(phase, info):
    if phase == "start":
        t0[0] = time.perf_counter()
    else:
        acc["passes"] += 1
        acc["seconds"] += time.perf_counter() - t0[0]
gc.callbacks.append(cb)
def done():
    out = os.environ.get("STARTUP_PROBE_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(acc) + "\\n")
atexit.register(done)
"""


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the process and its children, exit status)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="another checkout (a git worktree of the commit to compare)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stages", default="filter,stage1,eval")
    ap.add_argument("--pipeline", action="store_true", help="also the whole smoke pipeline, alternating")
    ap.add_argument("--out", default="outputs/bench/startup")
    args = ap.parse_args()
    out, before = Path(args.out).resolve(), Path(args.before).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "probe").mkdir(parents=True)
    (out / "probe" / "sitecustomize.py").write_text(PROBE)
    sys.path.insert(0, str(REPO / "bench"))
    from chaos import smoke_inputs

    over = smoke_inputs(out / "data", REPO / "outputs" / "models" / "tiny-qwen3")
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(out / "probe"))
    pipe = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=smoke"]
    wall, _, rc = timed([*pipe, f"output_dir={out / 'ref'}", *over], REPO, env)
    if rc != 0:
        sys.exit(f"the smoke pipeline failed (status {rc}): rerun it by hand to see why")
    trees = {"before": before, "now": REPO}
    result = {"before": str(before), "stages": {}, "pipeline": {}}
    for stage in args.stages.split(","):
        got = {name: {"wall": [], "cpu": [], "gc_s": [], "gc_passes": []} for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                shutil.rmtree(out / "ref" / stage, ignore_errors=True)
                probe = out / f"probe_{stage}_{name}.jsonl"
                probe.unlink(missing_ok=True)
                w, c, rc = timed([sys.executable, "-m", "qwen3train.cli.main", f"--config-dir={out / 'ref' / 'configs'}",
                                  f"--config-name=resolved_{stage}", "hydra/job_logging=stdout"], tree,
                                 dict(env, STARTUP_PROBE_OUT=str(probe)))
                if rc != 0:
                    sys.exit(f"{stage} in {tree} failed (status {rc})")
                gcs = [json.loads(x) for x in probe.read_text().splitlines()]
                for k, v in (("wall", w), ("cpu", c), ("gc_s", sum(g["seconds"] for g in gcs)),
                             ("gc_passes", sum(g["passes"] for g in gcs))):
                    got[name][k].append(round(v, 3))
        result["stages"][stage] = got
        b, n = statistics.median(got["before"]["wall"]), statistics.median(got["now"]["wall"])
        print(f"{stage}: wall before {got['before']['wall']} now {got['now']['wall']} -> {b / n:.2f}x; "
              f"gc s before {got['before']['gc_s']} now {got['now']['gc_s']}", flush=True)
    if args.pipeline:
        for _ in range(args.runs):
            for name, tree in trees.items():
                shutil.rmtree(out / f"pipe_{name}", ignore_errors=True)
                w, c, rc = timed([*pipe, f"output_dir={out / f'pipe_{name}'}", *over], tree, env)
                if rc != 0:
                    sys.exit(f"the smoke pipeline in {tree} failed (status {rc})")
                result["pipeline"].setdefault(name, {"wall": [], "cpu": []})
                result["pipeline"][name]["wall"].append(round(w, 1))
                result["pipeline"][name]["cpu"].append(round(c, 1))
        print(f"pipeline: {result['pipeline']}", flush=True)
    (out / "startup.json").write_text(json.dumps(result, indent=1))
    print(f"-> {out / 'startup.json'}")


if __name__ == "__main__":
    main()
