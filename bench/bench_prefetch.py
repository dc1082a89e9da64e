"""The data path's host time per training step, and what making batches ahead (``data.prefetch``) takes off it.

    .venv/bin/python bench/bench_prefetch.py [--steps 6] [--repeats 3]

1. Host milliseconds per step at the shapes of gpu-check's Qwen3-0.6B rows (the real Qwen3 tokenizer; queries
   <= 64, documents <= 256 tokens; demo pairs): reading and tokenizing a batch (collate), then cutting and
   packing its micro batches as the CUDA default does (varlen attention, one row, shared prefixes >= 16
   tokens). Before the data thread all of it ran between two GPU steps, and GradCache packed every chunk
   twice (once per pass): the GPU waited that long each step.
2. The loop's own step (``train_step`` as gpu-check times it) on the CPU with the tiny Qwen3 (hidden 64, 2
   layers: a step whose compute is short beside its data, as a 0.6B step is on a GPU), batches made in the
   loop (``prefetch`` 0) vs on the data thread (1), alternating within each repeat; median step time,
   real tokens/s, and the data time left in the step (``data_wait_ms``). Ratios matter, not absolute times.

Results: ``outputs/bench/bench_prefetch.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
MODEL = REPO / "outputs" / "models" / "tiny-qwen3"

# gpu-check's rows: (name, global batch, micro batch, hard negatives, GradCache)
SHAPES = [("s1 mb256", 256, 256, 0, False), ("s1 g1024 gradcache mb256", 1024, 256, 0, True),
          ("s2 mb64 3 negatives", 64, 64, 3, False)]


def _host_costs(data: Path, repeats: int) -> dict:
    from gpu_throughput import _enlarged

    from qwen3train.data.collate import EmbeddingCollator
    from qwen3train.data.instructions import Instructions
    from qwen3train.data.loader import Loader
    from qwen3train.data.sources import IndexedSource
    from qwen3train.models.build import SHARE_PREFIX
    from qwen3train.models.packing import pack_rows
    from qwen3train.text import DEFAULT_INSTRUCTION, EmbeddingTokenizer

    from transformers import AutoTokenizer

    tok = EmbeddingTokenizer(AutoTokenizer.from_pretrained(str(MODEL)))
    out = {}
    for name, g, micro, k, grad_cache in SHAPES:
        src = data / ("train_hn.jsonl" if k else "train_pairs.jsonl")
        if g > 512:
            src = _enlarged(src, REPO / "outputs" / "bench" / "data" / f"x4_{src.name}", 4)
        collate = EmbeddingCollator(tok, Instructions(default=DEFAULT_INSTRUCTION), k=k, seed=0, max_query_length=64,
                                    max_doc_length=256)
        batches = iter(Loader(IndexedSource([src], num_hard_negatives=k), collate, global_batch=g, seed=0))
        next(batches)
        made, packed = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            b = next(batches)
            made.append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, g, micro):
                mb = b.rows(slice(i, i + micro))
                pack_rows(mb.q + mb.pos + [n for row in mb.neg for n in row], tok.pad_id, "varlen", share=SHARE_PREFIX)
            packed.append(time.perf_counter() - t)
        c, p = statistics.median(made) * 1e3, statistics.median(packed) * 1e3
        out[name] = {"collate_ms": round(c, 1), "cut_and_pack_ms": round(p, 1),
                     "between_steps_before_ms": round(c + p * (2 if grad_cache else 1), 1),
                     "real_tokens": b.num_tokens}
        print(f"{name}: {out[name]}", flush=True)
    return out


def _loop(data: Path, steps: int, repeats: int) -> dict:
    import torch

    from gpu_throughput import _ours

    rows = {f"{shape} prefetch {d}": {"impl": "ours", "model": {"packing": True, "compile": False}, "micro": micro,
                                      "global": micro, "negatives": k, "prefetch": d}
            for shape, micro, k in (("s1 mb256", 256, 0), ("s2 mb64", 64, 3)) for d in (0, 1)}
    got: dict = {name: [] for name in rows}
    for _ in range(repeats):
        for name, row in rows.items():
            src = data / ("train_hn.jsonl" if row["negatives"] else "train_pairs.jsonl")
            got[name].append(_ours(MODEL, src, row, steps, torch.device("cpu")))
            print(f"{name}: {json.dumps(got[name][-1])[:240]}", flush=True)
    out = {}
    for name, runs in got.items():
        out[name] = {key: statistics.median(r[key] for r in runs)
                     for key in ("step_s", "tokens_per_s", "data_make_ms", "data_wait_ms")}
    for shape in ("s1 mb256", "s2 mb64"):
        out[f"{shape} step time, prefetch 0 / 1"] = round(out[f"{shape} prefetch 0"]["step_s"]
                                                          / out[f"{shape} prefetch 1"]["step_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from gpu_check import _demo_data

    data = _demo_data()
    res = {"host_costs_at_the_0.6b_rows": _host_costs(data, 5), "loop_on_cpu_tiny_qwen3": _loop(data, args.steps,
                                                                                               args.repeats)}
    path = REPO / "outputs" / "bench" / "bench_prefetch.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
