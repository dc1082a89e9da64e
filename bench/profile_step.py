"""Where a training step's time goes: stage 1 in this process, each phase timed, optionally the top kernels.

    python bench/profile_step.py [--kernels] [--config-name stage1] OVERRIDE...

Runs the real loop (``qwen3train.train.loop.run``) with the phases of each step timed (the host waits
for the device at each boundary, so the figures add up): ``prepare`` (records -> token ids),
``forward``, ``loss``, ``backward``, ``optimizer``, and the rest (logging, the plan). It also counts real
and padded tokens per step (the padding the backbone computes on; packed rows count their filler). Checkpoints are not written.
With ``--kernels`` the steps after the first three run under ``torch.profiler`` and the 15 most
expensive operators are printed. One JSON line on stdout starts with ``PROFILE``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-name", default="stage1")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qwen3train.config import register_configs
    from qwen3train.train import checkpoint, loop, task as task_mod, telemetry

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        # phases are timed on the loop's thread: batches made there too (data.prefetch=0), unless overridden
        overrides = ["data.prefetch=0", "run.save_every=0", *args.overrides]
        cfg = OmegaConf.to_object(compose(config_name=args.config_name, overrides=overrides))
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = defaultdict(list)
    tokens = {"real": [], "padded": []}
    current: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            current[name] += time.perf_counter() - t
            return out
        return wrapper

    # phases: patch the task and the engine classes the loop uses
    from qwen3train.data import collate as collate_mod

    collate_mod.EmbeddingCollator.__call__ = timed("prepare", collate_mod.EmbeddingCollator.__call__)
    cls = task_mod.EmbeddingTask
    cls.forward = timed("forward", cls.forward)
    cls.loss = timed("loss", cls.loss)
    from qwen3train.train import engine as engine_mod

    for eng in (engine_mod.TorchEngine, engine_mod.DeepSpeedEngine):
        eng.backward = timed("backward", eng.backward)
        eng.step = timed("optimizer", eng.step)

    # padded tokens: what the backbone is handed, counted at its input
    from qwen3train.models import embedder as emb_mod

    orig_pool = emb_mod.Embedder._pool

    def counting_pool(self, input_ids, attention_mask):
        current["padded_tokens"] += input_ids.numel()
        current["real_tokens"] += float(attention_mask.sum())
        return orig_pool(self, input_ids, attention_mask)

    emb_mod.Embedder._pool = counting_pool
    orig_pack, orig_packed = emb_mod.Embedder.pack, emb_mod.Embedder._pool_packed

    def counting_pack(self, seqs):  # packed forward: real tokens at packing, row tokens (with filler) at the pool
        packed = orig_pack(self, seqs)
        current["real_tokens"] += packed.num_tokens
        return packed

    def counting_packed(self, packed, last, order):
        current["padded_tokens"] += sum(kw["input_ids"].numel() for kw in packed)
        return orig_packed(self, packed, last, order)

    emb_mod.Embedder.pack, emb_mod.Embedder._pool_packed = counting_pack, counting_packed
    checkpoint.save = lambda *a, **kw: None  # measure steps, not the disk
    prof = None
    step_no = [0]
    last = [time.perf_counter()]

    def log(self, step, metrics, samples, toks):
        now = time.perf_counter()
        dt, last[0] = now - last[0], now
        step_no[0] += 1
        if step_no[0] > 2:  # the first steps warm up (allocator, kernels)
            for k in ("prepare", "forward", "loss", "backward", "optimizer"):
                times[k].append(current.get(k, 0.0))
            times["step"].append(dt)
            tokens["real"].append(current["real_tokens"])
            tokens["padded"].append(current["padded_tokens"])
            if self.peak:
                times["mfu"].append(self.flops_per_token * toks / dt / self.peak)
        current.clear()
        if prof is not None:
            prof.step()

    telemetry.Telemetry.log = log  # (no metrics.jsonl: the figures are printed)
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = profile(activities=acts, schedule=schedule(wait=3, warmup=1, active=4))
        prof.start()
    try:
        loop.run(cfg)
    except FileNotFoundError:
        pass  # final/ is copied from a checkpoint this script did not write
    finally:
        if prof is not None:
            prof.stop()
    res = {k: round(statistics.median(v), 4) for k, v in times.items() if v}
    res["other"] = round(res["step"] - sum(res.get(k, 0) for k in ("prepare", "forward", "loss", "backward",
                                                                     "optimizer")), 4)
    res["real_tokens"] = round(statistics.mean(tokens["real"]))
    res["padded_tokens"] = round(statistics.mean(tokens["padded"]))
    res["padded_over_real"] = round(res["padded_tokens"] / res["real_tokens"], 2)
    if cuda:
        res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["overrides"] = args.overrides
    if prof is not None:
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    print("PROFILE " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
