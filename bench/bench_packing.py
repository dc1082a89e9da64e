"""Packed (padding-free) stage-1 steps vs today's length buckets, side by side, on the CPU.

    .venv/bin/python bench/bench_packing.py [--steps 4] [--repeats 3] [--batch 32] [--precision bf16]

Model: SmolLM2-135M-Instruct (``make smollm2``), full fine-tuning, bf16 autocast where the CPU computes
bf16 (fp32 masters), the stage-1 shape of the real recipe: batch 32, queries <= 64 and documents <= 256
tokens, in-batch negatives, one hard negative per query from stage 2's shape with ``--negatives 1``.
Data: the real recipe's training pairs (stdlib docstrings + gensim's Wikipedia sample; ``make real-data``),
else the demo docstring pairs. The same batches for every variant:

  buckets : ``model.packing=false``, rows sorted by length in 4 groups each cut to its longest row
            (the CPU default before packing);
  padded  : ``model.packing=false model.length_buckets=1`` (one padded batch per tower);
  packed  : the new default (``model.packing=true``: rows of <= 2048 real tokens on the CPU, attention
            inside each sequence); packed-1row / packed-1024: ``model.pack_tokens`` 0 (one row) / 1024.

Each variant runs in its own process (2 threads), variants alternate within each repeat, and the median
step time is kept; tokens/s counts real tokens only. Ratios matter, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "outputs" / "models" / "smollm2-135m-instruct"
VARIANTS = {"buckets": dict(packing=False, length_buckets=4), "padded": dict(packing=False, length_buckets=1),
            "packed": dict(packing=True), "packed-1row": dict(packing=True, pack_tokens=0),
            "packed-1024": dict(packing=True, pack_tokens=1024)}


def _data() -> Path:
    for path in (REPO / "outputs" / "data" / "real" / "train.jsonl", REPO / "outputs" / "data" / "train_pairs.jsonl"):
        if path.exists():
            return path
    subprocess.run([sys.executable, "-m", "qwen3train.data.demo", str(REPO / "outputs" / "data")], check=True)
    return REPO / "outputs" / "data" / "train_pairs.jsonl"


def worker(variant: str, steps: int, batch: int, negatives: int, precision: str, data: str) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    from qwen3train.data.collate import EmbeddingCollator
    from qwen3train.data.instructions import Instructions
    from qwen3train.data.loader import Loader
    from qwen3train.data.sources import IndexedSource
    from qwen3train.losses.infonce import InfoNCELoss
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.train.engine import EngineConfig, TorchEngine
    from qwen3train.train.loop import train_step
    from qwen3train.train.schedule import OptimConfig
    from qwen3train.train.task import EmbeddingTask

    emb = build_embedder(ModelConfig(name_or_path=str(MODEL), max_query_length=64, max_doc_length=256,
                                     **VARIANTS[variant]), train_precision=precision)
    source = IndexedSource([Path(data)], num_hard_negatives=negatives)
    collate = EmbeddingCollator(emb.tok, Instructions(default="Given a question, retrieve passages that answer it"),
                                k=negatives, seed=0, max_query_length=64, max_doc_length=256)
    loader = Loader(source, collate, global_batch=batch, seed=0)
    task = EmbeddingTask(emb, InfoNCELoss(0.05, fn_margin=0.1, qq=True, dd=True), "x")
    engine = TorchEngine(emb, EngineConfig(micro_batch_size=batch, global_batch_size=batch, grad_clip=1.0),
                         OptimConfig(lr=1e-5), 100, precision=precision)
    batches = iter(loader)
    times, tokens, padded = [], [], []
    for i in range(steps + 1):
        b = next(batches)
        t = time.perf_counter()
        train_step(engine, task, b, 1, False)
        if i:  # the first step warms allocators and one-time costs
            times.append(time.perf_counter() - t)
            tokens.append(b.num_tokens)
            widths = [max(map(len, b.q)), max(len(x) for x in b.pos + [n for r in b.neg for n in r])]
            padded.append(len(b) * widths[0] + len(b) * (1 + negatives) * widths[1])
    return {"variant": variant, "step_s": statistics.median(times), "real_tokens": statistics.median(tokens),
            "padded_tokens_one_batch": statistics.median(padded),
            "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times))}


def measure(variant, steps, batch, negatives, precision, data) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", variant, str(steps), str(batch), str(negatives), precision, str(data)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--negatives", type=int, default=0)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--variants", default="buckets,padded,packed")
    a = ap.parse_args()
    if not (MODEL / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "qwen3train.synth.models", str(MODEL)], check=True)
    data = _data()
    names = a.variants.split(",")
    runs: dict[str, list] = {n: [] for n in names}
    for _ in range(a.repeats):
        for n in names:
            runs[n].append(measure(n, a.steps, a.batch, a.negatives, a.precision, data))
            print(json.dumps(runs[n][-1]), flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "real_tokens",
                                                                 "padded_tokens_one_batch")} for n, rs in runs.items()}
    print(f"\n## SmolLM2-135M stage-1 step, batch {a.batch}, {a.negatives} hard negatives, {a.precision}, "
          f"median of {a.repeats} runs x {a.steps} steps (data: {data.relative_to(REPO)})")
    print("| variant | step s | real tokens/s | real tokens / step | one padded batch's tokens |\n|---|---|---|---|---|")
    for n in names:
        m = med[n]
        print(f"| {n} | {m['step_s']:.2f} | {m['tokens_per_s']:.0f} | {m['real_tokens']:.0f} | "
              f"{m['padded_tokens_one_batch']:.0f} |")
    if "packed" in med:
        for n in names:
            if n != "packed":
                print(f"packed is {med[n]['step_s'] / med['packed']['step_s']:.2f}x faster than {n}")
    out = REPO / "outputs" / "bench" / "bench_packing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "median": med}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        v, s, b, k, prec, d = sys.argv[2:8]
        print(json.dumps(worker(v, int(s), int(b), int(k), prec, d)))
    else:
        main()
