"""Which stage-2 checkpoints to merge, and how: every merge of a run's checkpoints scored on the dev split
with per-query nDCG@10 and the paired bootstrap against the last checkpoint (docs/benchmarks.md).

    .venv/bin/python bench/merge_spacing.py outputs/data/real/dev.jsonl [run_dir] [steps...]
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qwen3train.eval.encoder import Encoder
from qwen3train.eval.metrics import paired_bootstrap
from qwen3train.eval.pairs import evaluate_pairs
from qwen3train.merge.apply import merge_folders

dev = sys.argv[1]
R = Path(sys.argv[2] if len(sys.argv) > 2 else "outputs/pipeline_real/stage2") / "checkpoints"
STEPS = [int(x) for x in sys.argv[3:]] or [8, 16, 24]
ck = {s: R / f"step_{s:07d}" / "model" for s in STEPS}
OUT = Path("outputs/bench/merge_spacing")
out = {}


def ev(name, path):
    t0 = time.time()
    enc = Encoder(path, max_length=256, batch_size=32, precision="bfloat16")
    r = evaluate_pairs(path, dev, encoder=enc, per_query=True)
    out[name] = r["per_query"]["ndcg@10"]
    print(name, round(r["ndcg@10"], 4), f"{time.time()-t0:.0f}s", flush=True)


for s, p in ck.items():
    ev(f"step{s}", p)
a, b, c = STEPS[-3:]
cands = [(f"multislerp_{a}_{b}_{c}", [a, b, c], "multislerp", 0.5), (f"slerp_{a}_{c}_t0.5", [a, c], "slerp", 0.5)]
cands += [(f"slerp_{b}_{c}_t{t}", [b, c], "slerp", t) for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
for name, steps, m, t in cands:
    d = merge_folders([ck[s] for s in steps], OUT / name, method=m, t=t)
    ev(name, d)
    shutil.rmtree(d)
json.dump(out, open(OUT / f"per_query_{Path(dev).stem}.json", "w"))
base = np.array(out[f"step{c}"])
for k, v in out.items():
    print(k, round(float(np.mean(v)), 4), f"diff vs step{c}", round(float(np.mean(v) - base.mean()), 4),
          "P(better)", round(paired_bootstrap(v, base, 2000), 3))
