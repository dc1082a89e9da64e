"""Training-step benchmark: qwen3train vs sentence-transformers, same model, data and batch.

    .venv/bin/python bench/bench_train.py            # full run (~10 min on 2 CPU cores)
    .venv/bin/python bench/bench_train.py --quick    # smoke

Model: a random Qwen3 (hidden 256, 4 layers, real Qwen3 tokenizer) exported once as a
sentence-transformers folder, so both frameworks load identical weights. Data: real pairs from
Python's stdlib docstrings (qwen3train.data.demo), queries formatted with the instruction for both.

1. Step time and peak memory at one batch: ours (plain InfoNCE, = MNRL), ours with the paper's full
   loss (q-q, d-d, margin mask), sentence-transformers MultipleNegativesRankingLoss.
2. GradCache sweep at a fixed chunk of 16: peak memory and step time against global batch, ours
   vs sentence-transformers CachedMultipleNegativesRankingLoss.
Each measurement runs in its own subprocess (peak RSS is per process); implementations alternate,
each configuration is repeated and the median is kept. Ratios matter, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "bench"
MAXLEN = 128


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare() -> tuple[Path, Path]:
    from qwen3train.data.demo import build
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.models.export import export_embedder
    from qwen3train.models.tiny import make_tiny_qwen3

    raw = make_tiny_qwen3(OUT / "raw-model", seed=0, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, intermediate_size=768)
    model = OUT / "model"
    if not (model / "modules.json").exists():
        emb = build_embedder(ModelConfig(name_or_path=str(raw), max_query_length=MAXLEN, max_doc_length=MAXLEN))
        export_embedder(emb, model, instruction="x")
    data = OUT / "data"
    if not (data / "train_pairs.jsonl").exists():
        build(data)
    return model, data / "train_pairs.jsonl"


def worker(impl: str, global_batch: int, micro: int, steps: int, model: str, data: str) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = [json.loads(x) for x in open(data)][: global_batch * (steps + 1)]
    from qwen3train.text import format_query

    if impl.startswith("ours"):
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

        emb = build_embedder(ModelConfig(name_or_path=model, max_query_length=MAXLEN, max_doc_length=MAXLEN))
        full = impl == "ours_paper_loss"
        loss = InfoNCELoss(0.05, fn_margin=0.1 if full else None, qq=full, dd=full, mask_identical_docs=full)
        source = IndexedSource([Path(data)])
        collate = EmbeddingCollator(emb.tok, Instructions(default="x"), k=0, seed=0, max_query_length=MAXLEN,
                                    max_doc_length=MAXLEN)
        loader = Loader(source, collate, global_batch=global_batch, seed=0)
        task = EmbeddingTask(emb, loss, "x")
        gc = impl == "ours_gradcache"
        ecfg = EngineConfig(micro_batch_size=micro if gc else global_batch, global_batch_size=global_batch,
                            grad_cache=gc, grad_clip=0.0)
        engine = TorchEngine(emb, ecfg, OptimConfig(lr=1e-4), 100)
        n_micro = ecfg.micro_steps(1)

        def step(i):
            items = [(k, 0) for k in range(i * global_batch, (i + 1) * global_batch)]
            train_step(engine, task, loader.collate_items(items, 0), n_micro, gc)
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss)

        st = SentenceTransformer(model, device="cpu")
        st.max_seq_length = MAXLEN
        if impl == "st_cached":
            loss_fn = CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=micro)
        else:
            loss_fn = MultipleNegativesRankingLoss(st, scale=20.0)
        opt = torch.optim.AdamW(st.parameters(), lr=1e-4)

        def step(i):
            chunk = rows[i * global_batch:(i + 1) * global_batch]
            qs = [format_query(r["query"], r["instruction"]) for r in chunk]
            ds = [r["pos"][0] for r in chunk]
            feats = [st.tokenize(qs), st.tokenize(ds)]
            loss_fn(feats, None).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocator, first-call costs)
    base = rss_mb()
    times = []
    for i in range(1, steps + 1):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    return {"impl": impl, "global_batch": global_batch, "micro": micro, "step_s": statistics.median(times),
            "peak_rss_mb": rss_mb(), "warm_rss_mb": base}


def measure(impl, global_batch, micro, steps, model, data) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, __file__, "--worker", impl, str(global_batch), str(micro), str(steps), str(model), str(data)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_runs(configs, repeats, model, data):
    res: dict[tuple, list] = {}
    for _ in range(repeats):  # alternate implementations within each repeat
        for c in configs:
            res.setdefault(c, []).append(measure(*c, model, data))
    out = []
    for c, runs in res.items():
        out.append({"impl": c[0], "global_batch": c[1], "micro": c[2],
                    "step_s": statistics.median(r["step_s"] for r in runs),
                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)})
    return out


def main(quick: bool) -> None:
    model, data = prepare()
    steps, repeats = (2, 1) if quick else (4, 3)
    b = 32
    step_cfgs = [("ours", b, b, steps), ("st_mnrl", b, b, steps), ("ours_paper_loss", b, b, steps)]
    step_res = median_runs(step_cfgs, repeats, model, data)
    sweep = [32, 128] if quick else [32, 64, 128, 256, 512]
    sweep_cfgs = [(impl, g, 16, 2) for g in sweep for impl in ("ours_gradcache", "st_cached")]
    sweep_res = median_runs(sweep_cfgs, 1 if quick else 2, model, data)
    result = {"step": step_res, "gradcache_sweep": sweep_res}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_train.json").write_text(json.dumps(result, indent=2))
    by = {r["impl"]: r for r in step_res}
    print(f"\n## step at global batch {b} (median of {repeats} runs x {steps} steps)")
    print("| impl | step s | peak RSS MB |\n|---|---|---|")
    for r in step_res:
        print(f"| {r['impl']} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} |")
    print(f"ratio step time st_mnrl / ours = {by['st_mnrl']['step_s'] / by['ours']['step_s']:.2f}; "
          f"peak RSS ours / st = {by['ours']['peak_rss_mb'] / by['st_mnrl']['peak_rss_mb']:.2f}")
    print("\n## GradCache sweep, chunk 16")
    print("| global batch | ours step s | ours peak MB | ST cached step s | ST cached peak MB |\n|---|---|---|---|---|")
    g = {(r["impl"], r["global_batch"]): r for r in sweep_res}
    for s in sweep:
        o, t = g[("ours_gradcache", s)], g[("st_cached", s)]
        print(f"| {s} | {o['step_s']:.3f} | {o['peak_rss_mb']:.0f} | {t['step_s']:.3f} | {t['peak_rss_mb']:.0f} |")
    lo, hi = g[("ours_gradcache", sweep[0])], g[("ours_gradcache", sweep[-1])]
    print(f"ours peak RSS at {sweep[-1]} / at {sweep[0]} = {hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        a = sys.argv[2:]
        print(json.dumps(worker(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], a[5])))
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--quick", action="store_true")
        main(ap.parse_args().quick)
