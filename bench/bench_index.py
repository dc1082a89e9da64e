"""The record index at scale vs `datasets`' JSON loader and its Arrow cache (what a user would pick).

    .venv/bin/python bench/bench_index.py --records 10000000 --work /tmp/bench_index

Writes N records of synthetic-pair shape (query ~10 words, one positive passage ~60 words, task,
instruction) to one JSONL file, then, each in fresh processes, side by side:

* ours, first start: 2 processes (torchrun, gloo) build the index together (units of 64 MiB shared
  round robin, rank 0 joins); restart: 2 processes open it again (memory-mapped);
* `datasets`: ``load_dataset("json", data_files=..., split="train")`` first (builds the Arrow cache;
  default settings, and ``num_proc=2``), then a restart (cache hit) in 2 concurrent processes.

Memory per process after touching everything it loaded (ours: the task ids, positive hashes and
offsets of every record; `datasets`: the ``query`` column of every row): RSS, and how much of it is
private to the process vs shared page cache (``/proc/self/smaps_rollup``). Also the time to plan one
epoch over all records (ours; `datasets` has no equivalent: batches are drawn without duplicate
control). Ratios matter, not absolute times (2 noisy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or has "
         "had first one their its new after who they two her she also been other more time into years "
         "city river music school team season during government world state war film series").split()


def smaps() -> dict:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":")
        out[k.strip()] = int(v.split()[0]) / 1024  # MiB
    return {"rss_mib": round(out["Rss"], 1), "pss_mib": round(out["Pss"], 1),
            "private_mib": round(out["Private_Clean"] + out["Private_Dirty"], 1),
            "shared_mib": round(out["Shared_Clean"] + out["Shared_Dirty"], 1)}


def gen(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choices(WORDS, k=10))
            p = " ".join(rng.choices(WORDS, k=60))
            f.write(json.dumps({"query": f"{q} {i}", "pos": [f"{p} {i}"], "task": "retrieval",
                                "instruction": "Given a query, retrieve relevant passages"}) + "\n")


def ours(path: str, index_dir: str, out: str) -> None:
    import numpy as np

    from qwen3train import dist
    from qwen3train.data.batching import plan
    from qwen3train.data.sources import IndexedSource

    dist.init()
    base = smaps()
    t = time.perf_counter()
    src = IndexedSource([Path(path)], index_dir=index_dir)
    t_open = time.perf_counter() - t
    f = src.files[0]
    touch = int(np.asarray(f.task).sum() + np.asarray(f.pos_hash).sum() % 7 + np.asarray(f.offset)[-1])
    mem = smaps()
    t = time.perf_counter()
    p = plan(src, 1024, 0, 0)
    t_plan = time.perf_counter() - t
    res = {"rank": dist.rank(), "records": len(src), "open_s": round(t_open, 2), "built": bool(src.index_stats["built"]),
           "plan_s": round(t_plan, 2), "batches": len(p), "touch": touch, **mem,
           "rss_before_mib": base["rss_mib"]}
    Path(out).with_suffix(f".rank{dist.rank()}.json").write_text(json.dumps(res))
    dist.cleanup()


def hf(path: str, cache: str, num_proc: int, out: str) -> None:
    import datasets

    datasets.disable_progress_bars()
    base = smaps()
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache,
                               num_proc=num_proc if num_proc > 1 else None)
    t_open = time.perf_counter() - t
    touch = sum(len(c) for c in ds.data.column("query").chunks)
    mem = smaps()
    Path(out).write_text(json.dumps({"records": len(ds), "open_s": round(t_open, 2), "touch": touch, **mem,
                                     "rss_before_mib": base["rss_mib"]}))


def run(cmd: list[str], env=None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--work", default="/tmp/bench_index")
    ap.add_argument("--role", default=None)
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    if a.role == "ours":
        return ours(*a.args)
    if a.role == "hf":
        return hf(a.args[0], a.args[1], int(a.args[2]), a.args[3])
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pairs_{a.records}.jsonl"
    if not data.exists():
        t = time.perf_counter()
        gen(data, a.records)
        print(f"wrote {data} ({data.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--role", "ours"]
    results = {"records": a.records, "bytes": data.stat().st_size}
    for name, ix in (("ours_first", "ix"), ("ours_restart", "ix")):
        if name == "ours_first":
            subprocess.run(["rm", "-rf", str(work / "ix")])
        wall = run(torchrun + [str(data), str(work / ix), str(work / name)], env)
        ranks = [json.loads(Path(work / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
        results[name] = {"wall_s": round(wall, 1), "ranks": ranks}
        print(name, results[name], flush=True)
    for name, nproc in (("hf_first", 1), ("hf_first_num_proc2", 2)):
        subprocess.run(["rm", "-rf", str(work / f"hfcache_{name}")])
        out = work / f"{name}.json"
        wall = run([py, __file__, "--role", "hf", str(data), str(work / f"hfcache_{name}"), str(nproc), str(out)], env)
        results[name] = {"wall_s": round(wall, 1), **json.loads(out.read_text())}
        print(name, results[name], flush=True)
    # restart: two processes at once, as two ranks of a job would (cache of the default build)
    cache = work / "hfcache_hf_first"
    t = time.perf_counter()
    procs = [subprocess.Popen([py, __file__, "--role", "hf", str(data), str(cache), "1", str(work / f"hf_restart{r}.json")],
                              env=env, cwd=REPO) for r in (0, 1)]
    for p in procs:
        assert p.wait() == 0
    results["hf_restart"] = {"wall_s": round(time.perf_counter() - t, 1),
                             "ranks": [json.loads((work / f"hf_restart{r}.json").read_text()) for r in (0, 1)]}
    print("hf_restart", results["hf_restart"], flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
