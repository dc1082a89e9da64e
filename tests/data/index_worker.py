"""Worker for the 2-process index test: join a gloo group, open the source, dump what it indexed."""

import json
import sys
from pathlib import Path

import numpy as np

from qwen3train import dist
from qwen3train.data.sources import IndexedSource

data, index_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist.init()
src = IndexedSource([Path(data)], on_error="skip", rejects_path=out / "rejects.jsonl", index_dir=index_dir,
                    unit_bytes=int(sys.argv[4]))
ids = np.arange(len(src))
res = {"n": len(src), "tasks": src.task_names, "task_idx": src.task_idx.tolist(),
       "hashes": src.positive_hashes(ids, np.zeros(len(src), np.int64)).tolist(),
       "queries": [src[i].query for i in range(len(src))], "rejected": dict(src.rejected),
       "built": src.index_stats["built"], "scanned": src.index_stats["units_scanned_here"]}
(out / f"rank{dist.rank()}.json").write_text(json.dumps(res))
dist.cleanup()
