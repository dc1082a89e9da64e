"""Chaos test of the pipeline: ``kill -9`` of the whole process tree at random moments of every stage of
the smoke pipeline (``configs/smoke.yaml``), then reruns until it finishes; the outputs must equal an
uninterrupted run's (weights bitwise, records and metrics exactly).

    .venv/bin/python bench/chaos.py [--trials 6] [--kills 4] [--seed 0] [override ...]

Overrides go to every run, e.g. ``synth.generator=outputs/models/tiny-qwen3`` for a faster stage 0.

A trial kills up to ``--kills`` times, each at a moment drawn inside one stage: U(0.1, 0.9) x the stage's
wall time in the reference run, counted from when the stages before it are marked done (so a resume that
runs faster or slower than the reference still gets the kill in that stage); later stages after earlier
ones; then it lets the run finish. Kills that land after the run ended are not counted.
``tests/test_chaos.py`` runs a fixed small set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["synth", "stage1", "filter", "mine", "stage2", "merge", "rerank_mine", "rerank", "eval", "report"]
# what must come out the same: weights bitwise, record files exactly, metrics exactly
COMPARED = ["synth/pairs.jsonl", "filter/kept.jsonl", "mine/mined.jsonl", "rerank_mine/mined.jsonl",
            "stage1/final/model.safetensors", "stage2/final/model.safetensors", "merged/model.safetensors",
            "rerank/final/model.safetensors", "eval/results.jsonl"]


def smoke_inputs(root: Path, model: Path) -> list[str]:
    """What configs/smoke.yaml reads, made under ``root``: the docstring pairs and corpus, a dev split cut from the
    training pairs (never the held-out pairs it evaluates on), ``model`` as backbone and generator; stage 0 writes
    for 2 passages at 16 tokens (the tiny model's output is rejected either way). Returns the overrides."""
    from qwen3train.data.demo import build

    build(root)
    rows = (root / "train_pairs.jsonl").read_text().splitlines()
    (root / "dev.jsonl").write_text("\n".join(rows[:40]) + "\n")
    return [f"model.name_or_path={model}", f"synth.generator={model}", f"synth.corpus=[{root / 'corpus.jsonl'}]",
            f"extra_stage1_data=[{root / 'train_pairs.jsonl'}]", f"extra_stage2_data=[{root / 'train_pairs.jsonl'}]",
            f"merge.dev_file={root / 'dev.jsonl'}", f"eval.pairs=[{root / 'heldout.jsonl'}]", "eval.collections=[]",
            "synth.max_passages=2", "synth.sampling.max_new_tokens=16", "mine.sample=300"]


def command(out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "qwen3train.cli.main", "--config-name=smoke", f"output_dir={out}", *overrides]


def run(out: Path, overrides: list[str], kill_in: tuple[list[str], float] | None = None,
        log=None) -> tuple[int | None, float]:
    """Run the smoke pipeline; with ``kill_in=(before, delay)``, SIGKILL its whole process group ``delay``
    seconds after every stage in ``before`` (those run before the one to interrupt) is marked done, so the
    kill lands in that stage however fast the machine is and however much of the run a resume skips.
    Returns (exit status, or None when killed; seconds)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWEN3TRAIN_PROGRESS="line")
    t = time.perf_counter()
    proc = subprocess.Popen(command(out, overrides), cwd=REPO, env=env, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if kill_in is None:
        proc.wait()
        return proc.returncode, time.perf_counter() - t
    before, delay = kill_in
    reached = None
    while proc.poll() is None:
        now = time.perf_counter()
        if reached is None and all((out / s / ".done.json").exists() for s in before):
            reached = now
        if reached is not None and now - reached >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, now - t
        time.sleep(0.05)
    return proc.returncode, time.perf_counter() - t


def stage_windows(out: Path) -> dict[str, tuple[float, float]]:
    """(start, wall seconds) of each stage in a finished run, from its markers' times: a stage runs from the
    previous marker to its own, its process start-up included (the first from its marker less its seconds)."""
    marks = {s: out / s / ".done.json" for s in STAGES if (out / s / ".done.json").exists()}
    if not marks:
        return {}
    first = next(iter(marks))
    t0 = marks[first].stat().st_mtime - json.loads(marks[first].read_text())["seconds"]
    out_, prev = {}, t0
    for s, m in marks.items():
        end = m.stat().st_mtime
        out_[s] = (prev - t0, max(end - prev, 0.0))
        prev = end
    return out_


def digest(path: Path) -> str | None:
    if not path.exists():
        return None
    if path.name == "results.jsonl":  # metrics: equal values (the file also names run-specific paths)
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return hashlib.sha256(json.dumps([{k: v for k, v in r.items() if k != "path"} for r in rows],
                                         sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(out: Path) -> dict[str, str | None]:
    return {rel: digest(out / rel) for rel in COMPARED}


def running_stage(out: Path) -> str:
    """The first stage without a done marker: the one a kill interrupted."""
    return next((s for s in STAGES if not (out / s / ".done.json").exists()), "finished")


def half_done(out: Path) -> list[str]:
    """Stages marked done whose outputs are missing (must never happen)."""
    bad = []
    for s in STAGES:
        marker = out / s / ".done.json"
        if marker.exists() and not all(Path(o).exists() for o in json.loads(marker.read_text())["outputs"]):
            bad.append(s)
    return bad


def trial(out: Path, ref: dict, windows: dict, kills: int, rng: random.Random, overrides: list[str],
          log, only: list[str] | None = None) -> dict:
    """Kill the run ``kills`` times at growing random moments (in stages drawn from ``only`` when given),
    then finish it; compare with ``ref``."""
    shutil.rmtree(out, ignore_errors=True)
    pool = [s for s in windows if s != "report" and (not only or s in only)]
    stages = sorted(rng.sample(pool, min(kills, len(pool))), key=STAGES.index)
    done_kills = []
    for s in stages:
        delay = rng.uniform(0.1, 0.9) * windows[s][1]
        before = [x for x in windows if STAGES.index(x) < STAGES.index(s)]
        rc, secs = run(out, overrides, kill_in=(before, delay), log=log)
        if rc is not None:  # finished before the kill: nothing interrupted
            break
        done_kills.append({"planned": s, "interrupted": running_stage(out), "after_s": round(secs, 1),
                           "into_stage_s": round(delay, 1), "half_done": half_done(out)})
    rc, _ = run(out, overrides, log=log)
    got = fingerprint(out)
    return {"kills": done_kills, "final_status": rc,
            "different": [k for k in COMPARED if got[k] != ref[k]], "half_done": half_done(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "outputs" / "chaos"))
    ap.add_argument("--stages", default="", help="draw the kills from these stages only (comma-separated)")
    ap.add_argument("--reuse-reference", action="store_true", help="keep <out>/reference from an earlier call")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run")
    a = ap.parse_args()
    only = [s for s in a.stages.split(",") if s]
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "chaos.log", "a")
    ref_dir = root / "reference"
    if a.reuse_reference and (ref_dir / "report" / ".done.json").exists():
        secs = sum(w[1] for w in stage_windows(ref_dir).values())
    else:
        shutil.rmtree(ref_dir, ignore_errors=True)
        rc, secs = run(ref_dir, a.overrides, log=log)
        assert rc == 0, "the reference run failed (see chaos.log)"
    ref, windows = fingerprint(ref_dir), stage_windows(ref_dir)
    print(json.dumps({"reference_s": round(secs, 1), "stages": windows}), flush=True)
    rng = random.Random(a.seed)
    results = []
    for k in range(a.trials):
        res = trial(root / f"trial{k}", ref, windows, a.kills, rng, a.overrides, log, only)
        results.append(res)
        print(json.dumps(res), flush=True)
    kills = [x for r in results for x in r["kills"]]
    summary = {"trials": len(results), "kills": len(kills),
               "stages_interrupted": sorted({x["interrupted"] for x in kills}),
               "trials_equal_to_reference": sum(not r["different"] and r["final_status"] == 0 for r in results),
               "half_done_seen": sum(bool(x["half_done"]) for x in kills) + sum(bool(r["half_done"]) for r in results)}
    name = f"chaos{'_' + '_'.join(only) if only else ''}.json"
    (root / name).write_text(json.dumps({"summary": summary, "trials": results}, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
