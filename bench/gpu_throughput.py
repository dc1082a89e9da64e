"""gpu-check section t: training throughput of the Qwen3-0.6B shape, ours vs sentence-transformers.

Rows, most important first, each written to ``<out>/partial_t_throughput.json`` as soon as it is
measured (a run stopped at its time limit keeps every finished row):

  stage 1 (queries <= 64, documents <= 256 tokens, the paper's loss) at micro-batch 64: eager-padded
  (the old default), packed (eager), packed + compiled (the new CUDA default); the same at 256;
  global batch 1,024 with GradCache (chunks of 256 rows, and chunks cut by a token budget);
  sentence-transformers MNRL at 64 and 256 and CachedMNRL at 1,024 (bf16 autocast, fp32 weights, as its
  trainer's ``bf16=True``); stage 2 (3 hard negatives) padded vs packed + compiled; the packed attention
  backends against each other. Then what decides the next steps toward 30% MFU: the best configuration
  profiled (GPU time by kernel class, GPU busy share of the step, launches per step), CUDA graphs
  (``model.compile_mode=reduce-overhead``), bf16 weights without autocast's per-forward casts (the
  ceiling of what bf16 compute copies beside the fp32 masters could save) and max-autotune.

Each row: tokens/s on real tokens, MFU (6 x non-embedding parameters per real token) against the
spec peak and against a bf16 matmul this section times itself, step time, peak GPU memory, the loss.
A summary names the best configuration and the goals of the issue (MFU >= 30%, >= 2x
sentence-transformers' tokens/s, GradCache at 1,024 within 1.4x the per-token cost of the largest
plain batch). On the CPU (``QWEN3TRAIN_GPU_CHECK_ON_CPU=1``) the same code runs on the tiny model with
small batches, so CI keeps it working.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _matmul_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t) / 1e12


def _enlarged(src: Path, dst: Path, copies: int) -> Path:
    """``copies`` of every record, each copy's query and passages marked with its number (distinct texts:
    the loader defers duplicates), for global batches larger than the demo data."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for c in range(copies):
            for x in src.read_text().splitlines():
                if x.strip():
                    r = json.loads(x)
                    r["query"] = f"{r['query']} ({c})"
                    for key in ("pos", "neg"):
                        if key in r:
                            r[key] = [f"{t} ({c})" for t in r[key]]
                    lines.append(json.dumps(r) + "\n")
        dst.write_text("".join(lines))
    return dst


def _records(path: Path, n: int) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [rows[i % len(rows)] for i in range(n)]


def _ours(model_dir: Path, data: Path, row: dict, steps: int, device) -> dict:
    import torch

    from qwen3train.data.collate import EmbeddingCollator
    from qwen3train.data.instructions import Instructions
    from qwen3train.data.loader import Loader
    from qwen3train.data.sources import IndexedSource
    from qwen3train.losses.infonce import InfoNCELoss
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.train.engine import EngineConfig
    from qwen3train.train.task import EmbeddingTask

    k = row.get("negatives", 0)
    mcfg = ModelConfig(name_or_path=str(model_dir), dtype="bfloat16", max_query_length=64, max_doc_length=256,
                       **row["model"])
    emb = build_embedder(mcfg, train_precision="bf16")
    source = IndexedSource([data], num_hard_negatives=k)
    collate = EmbeddingCollator(emb.tok, Instructions(default="Given a question, retrieve passages that answer it"),
                                k=k, seed=0, max_query_length=64, max_doc_length=256)
    g, micro = row["global"], row["micro"]
    loader = Loader(source, collate, global_batch=g, seed=0)
    task = EmbeddingTask(emb, InfoNCELoss(0.05, fn_margin=0.1, qq=True, dd=True), "x")
    ecfg = EngineConfig(micro_batch_size=micro, global_batch_size=g, grad_cache=row.get("grad_cache", False),
                        micro_batch_tokens=row.get("micro_batch_tokens"))
    if row.get("bf16_weights"):
        # weights (and AdamW) in bf16, so autocast casts nothing: not a training recipe (pure bf16 updates lose
        # most of a small lr's steps, qwen3train/precision.py) but the step's cost without the fp32 -> bf16
        # weight casts and the fp32 gradient accumulation: the most bf16 compute copies could save
        emb.to(torch.bfloat16)
    return _train_steps(emb, task, loader, ecfg, row, steps, device,
                        {"attention": emb.packing or "padded (sdpa)", "compile_mode": mcfg.compile_mode or "default"})


def _train_steps(model, task, loader, ecfg, row: dict, steps: int, device, extra: dict) -> dict:
    """Timed training steps of ``task`` as the loop runs them (its ``train_step``, bf16 autocast, fp32 AdamW; the
    next batch made and packed on the data thread during the step, ``data.prefetch``, unless the row sets
    ``prefetch: 0``), then two more under the profiler when the row asks."""
    from qwen3train.train.build import attention_flops, flops_per_token
    from qwen3train.train.engine import TorchEngine
    from qwen3train.train.loop import prepare_batch, train_step
    from qwen3train.train.schedule import OptimConfig

    engine = TorchEngine(model, ecfg, OptimConfig(lr=1e-5), 1000, precision="bf16")
    n_micro = ecfg.micro_steps(1)
    ahead = loader.ahead(1 << 30, prepare_batch(task, n_micro, ecfg.micro_batch_tokens), depth=row.get("prefetch", 1))

    waits, computed = [], []
    per_sq_token = attention_flops(model, [1])  # 12 L H Q: a step's attention FLOPs are this x sum(t^2)

    def step():
        waited = ahead.wait_s
        b = next(ahead)
        loss, _, _ = train_step(engine, task, b, n_micro, ecfg.grad_cache, ecfg.micro_batch_tokens)
        ahead.settle()
        waits.append(ahead.wait_s - waited)
        packs = [mb.packed for mb in b.micro[1] if mb.packed is not None]
        if packs:  # tokens the backbone ran: a shared prefix once, filler segments included
            computed.append(sum(int(r.input_ids.shape[1]) for p in packs for r in p.rows))
        return float(loss), b.num_tokens, per_sq_token * sum(len(x) ** 2 for x in b.sequences())

    with ahead:
        got = _timed(step, steps, device, flops_per_token(model), extra=extra)
        # host time per step: making a batch (read, tokenize, cut, pack; mean) and what a timed step still waited
        # for it (median: the first batch, made before any step could hide it, is not one of them)
        got["data_make_ms"] = round(1e3 * ahead.make_s / ahead.made, 1)
        got["data_wait_ms"] = round(1e3 * statistics.median(waits[2:]), 1)
        if computed:  # below real_tokens_per_step where shared prefixes ran once: MFU on real tokens is then effective
            got["computed_tokens_per_step"] = round(statistics.mean(computed))
        if row.get("profile"):
            got["profile"] = _profiled(step, 2, device)
    return got


def _ours_rerank(model_dir: Path, data: Path, row: dict, steps: int, device) -> dict:
    """The reranker track's step: 1 positive + ``negatives`` per query, the listwise loss, the yes/no prompt
    at length <= 384. Tokens count every sequence's own tokens: with shared prefixes (``model.share_prefix``)
    the model computes fewer, so its MFU is an effective one (marked)."""
    from qwen3train.data.collate import RerankCollator
    from qwen3train.data.instructions import Instructions
    from qwen3train.data.loader import Loader
    from qwen3train.data.sources import IndexedSource
    from qwen3train.losses import build_loss
    from qwen3train.losses.rerank import RerankLossConfig
    from qwen3train.models.build import ModelConfig, build_reranker
    from qwen3train.models.reranker import DEFAULT_RERANK_INSTRUCTION
    from qwen3train.train.engine import EngineConfig
    from qwen3train.train.rerank_task import RerankTask

    k = row.get("negatives", 3)
    mcfg = ModelConfig(name_or_path=str(model_dir), dtype="bfloat16", max_doc_length=384, **row["model"])
    rr = build_reranker(mcfg, max_length=384, train_precision="bf16")
    collate = RerankCollator(rr.token_ids, Instructions(default=DEFAULT_RERANK_INSTRUCTION), k=k, seed=0)
    g, micro = row["global"], row["micro"]
    loader = Loader(IndexedSource([data], num_hard_negatives=k), collate, global_batch=g, seed=0)
    task = RerankTask(rr, build_loss(RerankLossConfig(objective="listwise")))
    ecfg = EngineConfig(micro_batch_size=micro, global_batch_size=g)
    share = rr.pack_share or 0
    extra = {"attention": rr.packing or "padded (sdpa)", "shared_prefix_min": share}
    if share:
        extra["mfu_note"] = "effective: a shared prefix's tokens count for every sequence that shares them"
    return _train_steps(rr, task, loader, ecfg, row, steps, device, extra)


# Kernel classes, first match wins (lower-cased substrings of kernel names: cuBLAS/CUTLASS GEMMs on Hopper are
# nvjet_*, sm90_xmma_gemm_*, cutlass*; Inductor's fused kernels are triton_*; torch's varlen and SDPA attention
# are flash_*/fmha*; eager casts are direct_copy/to_copy elementwise kernels). On the CPU (the rehearsal) the
# names are torch operators instead, classed by the same rules.
KERNEL_CLASSES = (
    ("compiled (triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_sdp")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                "aten::matmul", "mkldnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cast/copy", ("copy", "cast", "to_copy", "memcpy", "aten::to", "convert")),
    ("reduction", ("reduce", "norm", "sum", "mean", "softmax", "logsumexp")),
    ("embedding/index", ("index", "embedding", "gather", "scatter")),
    ("memset", ("memset", "fill", "zero")),
    ("elementwise", ("elementwise", "mul", "add", "silu", "sigmoid", "pow", "rsqrt", "div", "exp", "neg", "cat")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def kernel_summary(kernels: list[tuple[str, float]], steps: int, wall_s: float) -> dict:
    """``kernels``: (name, device microseconds) of every kernel of ``steps`` steps that took ``wall_s``.
    -> device ms per step, its share of the wall time (below 1: the host is too slow to keep the device fed,
    where CUDA graphs pay), launches per step, the share of each class, the 12 costliest kernels."""
    total = sum(us for _, us in kernels)
    by_cls: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for name, us in kernels:
        cls = classify_kernel(name)
        by_cls[cls] = by_cls.get(cls, 0.0) + us
        by_name[name] = by_name.get(name, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"device_ms_per_step": round(total / 1e3 / steps, 2),
            "device_busy": round(total / 1e6 / wall_s, 3) if wall_s > 0 else None,
            "launches_per_step": round(len(kernels) / steps),
            "classes": {k: round(v / total, 3) for k, v in sorted(by_cls.items(), key=lambda kv: -kv[1])} if total else {},
            "top": [[n[:90], round(us / 1e3 / steps, 3)] for n, us in top]}


def _profiled(step, steps: int, device) -> dict:
    """``steps`` more steps under torch.profiler: the kernels (CUDA) or the operators' own time (CPU)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t
    if cuda:
        kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:  # operators' self time (their children's excluded, so nothing counts twice): the CPU's "kernels"
        kernels = [(e.name, e.self_cpu_time_total) for e in prof.events()
                   if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]
    return kernel_summary(kernels, steps, wall)


def _timed(step, steps: int, device, fpt: float, extra: dict | None = None) -> dict:
    import torch

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.perf_counter()
    first_loss, _, _ = step()  # warm-up: compilation, allocator, autotuning
    step()
    sync()
    warm = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, toks, losses, attn = [], [], [], []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        loss, n, a = step()
        sync()
        times.append(time.perf_counter() - t)
        toks.append(n)
        losses.append(loss)
        attn.append(a)
    tps = statistics.median(n / s for n, s in zip(toks, times))
    out = {"tokens_per_s": round(tps), "step_s": round(statistics.median(times), 4), "warmup_s": round(warm, 1),
           "real_tokens_per_step": round(statistics.mean(toks)), "loss_first": round(first_loss, 4),
           "loss_last": round(losses[-1], 4), "flops_per_token": fpt,
           # attention's matmuls per real token, which 6N leaves out (PaLM's model FLOPs count them)
           "attention_flops_per_token": round(sum(attn) / sum(toks)), **(extra or {})}
    if cuda:
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _st(model_dir: Path, data: Path, row: dict, steps: int, device) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers 6 keeps them under sentence_transformer.losses too
        from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                       MultipleNegativesRankingLoss)
    from qwen3train.train.build import attention_flops, flops_per_token
    from qwen3train.text import format_query

    st = SentenceTransformer(str(model_dir), device=str(device), model_kwargs={"dtype": torch.float32})
    st.max_seq_length = 256
    g = row["global"]
    loss_fn = (CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=row["micro"]) if row.get("cached")
               else MultipleNegativesRankingLoss(st, scale=20.0))
    opt = torch.optim.AdamW(st.parameters(), lr=1e-5)
    recs = _records(data, g * (steps + 3))
    fpt = flops_per_token(st[0].auto_model)
    per_sq_token = attention_flops(st[0].auto_model, [1])
    state = {"i": 0}
    instr = "Given a question, retrieve passages that answer it"

    def step():
        chunk = recs[state["i"] * g:(state["i"] + 1) * g]
        state["i"] += 1
        st.max_seq_length = 64  # the same budgets as ours: queries 64, documents 256 tokens
        q = st.tokenize([format_query(r["query"], instr) for r in chunk])
        st.max_seq_length = 256
        d = st.tokenize([r["pos"][0] for r in chunk])
        lengths = q["attention_mask"].sum(1).tolist() + d["attention_mask"].sum(1).tolist()
        n = int(sum(lengths))
        feats = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in (q, d)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(feats, None)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), n, per_sq_token * sum(t * t for t in lengths)

    return _timed(step, steps, device, fpt, extra={"attention": "padded (sdpa)"})


def rows(cuda: bool) -> list[dict]:
    """Most important first. ``model``: ModelConfig overrides; eager-padded = the old default."""
    padded = {"packing": False, "length_buckets": 1, "compile": False}
    packed = {"packing": True, "compile": False}
    compiled = {"packing": True, "compile": True}
    if not cuda:  # the CPU rehearsal: the code paths, at toy sizes
        return [{"name": "s1 mb8 eager-padded", "impl": "ours", "model": padded, "micro": 8, "global": 8},
                {"name": "s1 g16 gradcache 400-token chunks packed", "impl": "ours", "model": packed, "micro": 8,
                 "global": 16, "grad_cache": True, "micro_batch_tokens": 400},
                {"name": "st cached g16 mini8", "impl": "st", "micro": 8, "global": 16, "cached": True},
                {"name": "s1 mb8 packed bf16-weights profiled", "impl": "ours", "model": packed, "micro": 8,
                 "global": 8, "bf16_weights": True, "profile": True},
                {"name": "rr mb4 packed", "impl": "rerank", "model": packed, "micro": 4, "global": 4, "negatives": 3}]
    return [
        {"name": "s1 mb64 eager-padded", "impl": "ours", "model": padded, "micro": 64, "global": 64},
        {"name": "s1 mb64 packed", "impl": "ours", "model": packed, "micro": 64, "global": 64},
        {"name": "s1 mb64 packed+compiled", "impl": "ours", "model": compiled, "micro": 64, "global": 64},
        {"name": "st mnrl mb64", "impl": "st", "micro": 64, "global": 64},
        {"name": "s1 mb256 packed+compiled", "impl": "ours", "model": compiled, "micro": 256, "global": 256},
        {"name": "st mnrl mb256", "impl": "st", "micro": 256, "global": 256},
        {"name": "s1 g1024 gradcache mb256 packed+compiled", "impl": "ours", "model": compiled, "micro": 256,
         "global": 1024, "grad_cache": True, "steps": 3},
        {"name": "s1 g1024 gradcache 64k-token chunks packed+compiled", "impl": "ours", "model": compiled,
         "micro": 256, "global": 1024, "grad_cache": True, "micro_batch_tokens": 65536, "steps": 3},
        # mini-batches of 256 padded rows run out of the H200's 139 GiB (measured): its largest that fits
        {"name": "st cached g1024 mini64", "impl": "st", "micro": 64, "global": 1024, "cached": True, "steps": 3},
        {"name": "s2 mb64 eager-padded", "impl": "ours", "model": padded, "micro": 64, "global": 64, "negatives": 3},
        {"name": "s2 mb64 packed+compiled", "impl": "ours", "model": compiled, "micro": 64, "global": 64,
         "negatives": 3},
        {"name": "s1 mb256 eager-padded", "impl": "ours", "model": padded, "micro": 256, "global": 256},
        {"name": "s1 mb256 packed+compiled flex", "impl": "ours", "model": {**compiled, "packed_attention": "flex"},
         "micro": 256, "global": 256},
        {"name": "s1 mb256 packed+compiled padded-attn", "impl": "ours",
         "model": {**compiled, "packed_attention": "padded"}, "micro": 256, "global": 256},
        {"name": "s1 mb256 packed eager", "impl": "ours", "model": packed, "micro": 256, "global": 256},
        # toward 30% MFU: where the best configuration's time goes, then the candidates it points at
        {"name": "s1 mb256 packed+compiled profiled", "impl": "ours", "model": compiled, "micro": 256, "global": 256,
         "profile": True},
        {"name": "s1 mb64 packed+compiled profiled", "impl": "ours", "model": compiled, "micro": 64, "global": 64,
         "profile": True},
        {"name": "s1 mb64 packed+compiled cudagraphs", "impl": "ours",
         "model": {**compiled, "compile_mode": "reduce-overhead"}, "micro": 64, "global": 64},
        {"name": "s1 mb256 packed+compiled cudagraphs", "impl": "ours",
         "model": {**compiled, "compile_mode": "reduce-overhead"}, "micro": 256, "global": 256},
        {"name": "s1 mb256 packed+compiled bf16-weights", "impl": "ours", "model": compiled, "micro": 256,
         "global": 256, "bf16_weights": True},
        {"name": "s1 mb64 packed+compiled bf16-weights", "impl": "ours", "model": compiled, "micro": 64,
         "global": 64, "bf16_weights": True},
        {"name": "s1 mb256 packed+compiled max-autotune-no-cudagraphs", "impl": "ours",
         "model": {**compiled, "compile_mode": "max-autotune-no-cudagraphs"}, "micro": 256, "global": 256},
        # the reranker track: 32 queries x (1 positive + 3 negatives) a step, yes/no prompts <= 384 tokens
        {"name": "rr mb32 eager-padded", "impl": "rerank", "model": padded, "micro": 32, "global": 32, "negatives": 3},
        {"name": "rr mb32 packed+compiled", "impl": "rerank", "model": compiled, "micro": 32, "global": 32,
         "negatives": 3},
        {"name": "rr mb32 packed+compiled no-share", "impl": "rerank", "model": {**compiled, "share_prefix": 0},
         "micro": 32, "global": 32, "negatives": 3},
        # GradCache's no-grad pass calls each compiled layer with no backward pending, which CUDA-graph trees
        # take as a new iteration each time: whether that holds is what this row finds out
        {"name": "s1 g1024 gradcache mb256 packed+compiled cudagraphs", "impl": "ours",
         "model": {**compiled, "compile_mode": "reduce-overhead"}, "micro": 256, "global": 1024, "grad_cache": True,
         "steps": 3},
        # the batches made in the loop, as before data.prefetch: what the data thread takes off the step
        {"name": "s1 mb256 packed+compiled no-prefetch", "impl": "ours", "model": compiled, "micro": 256,
         "global": 256, "prefetch": 0},
        {"name": "s2 mb64 packed+compiled no-prefetch", "impl": "ours", "model": compiled, "micro": 64, "global": 64,
         "negatives": 3, "prefetch": 0},
    ]


# The rows a short lease runs first (QWEN3TRAIN_THROUGHPUT_ROWS=next): the best configurations again beside
# what the last check left unmeasured
NEXT_ROWS = ("s2 mb64 packed+compiled", "s2 mb64 packed+compiled no-prefetch", "s1 mb256 packed+compiled profiled",
             "s1 mb256 packed+compiled no-prefetch", "s1 g1024 gradcache mb256 packed+compiled",
             "s1 mb64 packed+compiled profiled", "s1 mb256 packed+compiled bf16-weights",
             "s1 mb64 packed+compiled cudagraphs", "s1 mb256 packed+compiled cudagraphs",
             "s1 mb64 packed+compiled bf16-weights", "s1 mb256 packed+compiled max-autotune-no-cudagraphs",
             "s1 g1024 gradcache mb256 packed+compiled cudagraphs", "rr mb32 packed+compiled", "rr mb32 eager-padded",
             "rr mb32 packed+compiled no-share")


def summary(res: dict, spec_peak: float | None, matmul_tflops: float | None) -> dict:
    done = {k: v for k, v in res.items() if "tokens_per_s" in v}
    for r in done.values():
        flops = r["flops_per_token"] * r["tokens_per_s"]
        # + attention's matmuls (PaLM's model FLOPs, as most published MFU figures count): the goal stays on 6N
        with_attention = (r["flops_per_token"] + r.get("attention_flops_per_token", 0)) * r["tokens_per_s"]
        if spec_peak:
            r["mfu_spec"] = round(flops / spec_peak, 4)
            r["mfu_spec_with_attention"] = round(with_attention / spec_peak, 4)
        if matmul_tflops:
            r["mfu_matmul"] = round(flops / (matmul_tflops * 1e12), 4)
            r["mfu_matmul_with_attention"] = round(with_attention / (matmul_tflops * 1e12), 4)
    # bf16-weights rows measure a ceiling, not a way to train: never "best", never a goal
    ours = {k: v for k, v in done.items() if k.startswith(("s1 ", "s2 ")) and "bf16-weights" not in k}
    out: dict = {}
    if ours:
        best = max(ours, key=lambda k: ours[k]["tokens_per_s"])
        out["best"] = best
        if "mfu_spec" in ours[best]:
            out["best_mfu_spec"] = ours[best]["mfu_spec"]
            out["best_mfu_spec_with_attention"] = ours[best]["mfu_spec_with_attention"]
            out["goal_mfu_30pct"] = ours[best]["mfu_spec"] >= 0.30
    st = [v["tokens_per_s"] for k, v in done.items() if k.startswith("st ")]
    if ours and st:
        out["ours_best_over_st_best"] = round(max(v["tokens_per_s"] for v in ours.values()) / max(st), 2)
        out["goal_2x_st"] = out["ours_best_over_st_best"] >= 2.0
    plain = [v for k, v in ours.items() if "gradcache" not in k and k.startswith("s1 ")]
    cached = [v for k, v in ours.items() if "gradcache" in k]
    if plain and cached:
        fastest_plain = max(plain, key=lambda v: v["tokens_per_s"])["tokens_per_s"]
        ratio = fastest_plain / max(v["tokens_per_s"] for v in cached)
        out["gradcache_cost_per_token_ratio"] = round(ratio, 2)
        out["goal_gradcache_1_4x"] = ratio <= 1.4
    for name in ("s1 mb64", "s2 mb64", "s1 mb256", "rr mb32"):
        a, b = done.get(f"{name} eager-padded"), done.get(f"{name} packed+compiled")
        if a and b:
            out[f"{name} packed+compiled / eager-padded"] = round(b["tokens_per_s"] / a["tokens_per_s"], 2)
    for name in ("s1 mb64", "s1 mb256", "s2 mb64"):
        base = done.get(f"{name} packed+compiled") or done.get(f"{name} packed+compiled profiled")
        for variant in ("cudagraphs", "bf16-weights", "max-autotune-no-cudagraphs", "no-prefetch"):
            v = done.get(f"{name} packed+compiled {variant}")
            if base and v:
                out[f"{name} {variant} / packed+compiled"] = round(v["tokens_per_s"] / base["tokens_per_s"], 2)
    return out


def section_throughput(out: Path, quick: bool, budget_s: float = 420.0) -> dict:
    import torch

    from gpu_check import _cuda, _demo_data, _run_here
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.models.export import export_embedder
    from qwen3train.models.tiny import QWEN3_0_6B_SHAPE, make_tiny_qwen3
    from qwen3train.text import DEFAULT_INSTRUCTION
    from qwen3train.train.telemetry import peak_flops

    if not _run_here():
        return {"skipped": "needs CUDA (CPU figures: bench/bench_packing.py)"}
    # a device lease shorter than the whole check: QWEN3TRAIN_THROUGHPUT_BUDGET_S caps this section's rows
    budget_s = float(os.environ.get("QWEN3TRAIN_THROUGHPUT_BUDGET_S", budget_s))
    cuda = _cuda()
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    shape = QWEN3_0_6B_SHAPE if cuda else {}
    name = "qwen3-0.6b-random" if cuda else "tiny-qwen3"
    raw = make_tiny_qwen3(out / "models" / name, dtype="bfloat16" if cuda else "float32", **shape)
    export = out / "models" / f"{name}-export"
    if not (export / "modules.json").exists():  # what sentence-transformers loads: the same weights
        export_embedder(build_embedder(ModelConfig(name_or_path=str(raw), dtype="bfloat16" if cuda else "float32")),
                        export, instruction=DEFAULT_INSTRUCTION)
    data = _demo_data()
    res: dict = {"model": name, "device": str(torch.cuda.get_device_name() if cuda else "cpu"),
                 "spec_peak_tflops": (peak_flops() or 0) / 1e12 or None, "matmul_tflops": None, "rows": {}}
    res["matmul_tflops"] = round(_matmul_tflops(device), 1) if cuda else None
    partial = out / "partial_t_throughput.json"
    todo = rows(cuda)
    if quick and cuda:
        todo = todo[:9]
    if os.environ.get("QWEN3TRAIN_THROUGHPUT_ROWS"):  # a chosen subset, in the order given (a short lease)
        by_name = {r["name"]: r for r in rows(cuda)}
        names = os.environ["QWEN3TRAIN_THROUGHPUT_ROWS"].split(",")
        if names == ["next"]:  # on the CPU (a rehearsal) every row of its own
            names = list(NEXT_ROWS) if cuda else list(by_name)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"QWEN3TRAIN_THROUGHPUT_ROWS: no row named {unknown[0]!r}; rows: {', '.join(by_name)}")
        todo = [by_name[n] for n in names]
    for row in todo:
        if time.perf_counter() - start > budget_s:
            res["rows"][row["name"]] = {"skipped": f"section budget of {budget_s:.0f} s spent"}
            continue
        steps = row.get("steps", 5) if cuda else 1
        src = data / ("train_hn.jsonl" if row.get("negatives") else "train_pairs.jsonl")
        if row["global"] > 512:  # the demo's 1,636 distinct pairs make no batch of 1,024: four marked copies
            src = _enlarged(src, out / "data" / f"x4_{src.name}", 4)
        try:
            fn = {"ours": _ours, "rerank": _ours_rerank, "st": _st}[row["impl"]]
            got = fn(export if row["impl"] == "st" else raw, src, row, steps, device)
            got["batch"] = {"global": row["global"], "micro": row["micro"],
                            **({"micro_batch_tokens": row["micro_batch_tokens"]} if "micro_batch_tokens" in row else {})}
        except Exception as e:  # noqa: BLE001 - one row's failure (OOM, a missing kernel) is recorded, the rest run
            got = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        res["rows"][row["name"]] = got
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        spec = res["spec_peak_tflops"] * 1e12 if res["spec_peak_tflops"] else None
        res["summary"] = summary(res["rows"], spec, res["matmul_tflops"])
        res["elapsed_s"] = round(time.perf_counter() - start, 1)
        partial.write_text(json.dumps(res, indent=2))
        print(f"[gpu-check] t {row['name']}: {json.dumps(got)[:300]}", flush=True)
    return res


def markdown(sec: dict) -> list[str]:
    if not sec.get("rows"):
        return []
    lines = ["", f"Throughput, {sec.get('model')} ({sec.get('device')}; bf16 matmul {sec.get('matmul_tflops')} "
             f"TFLOP/s measured, spec {sec.get('spec_peak_tflops')}):", "",
             "| row | tokens/s (real) | MFU spec | + attention | MFU vs matmul | step s | peak GiB | attention |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sec["rows"].items():
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | {'skipped' if 'skipped' in r else 'failed'} | | | | | | |")
            continue
        lines.append(f"| {name} | {r['tokens_per_s']:,} | {r.get('mfu_spec', '-')} | "
                     f"{r.get('mfu_spec_with_attention', '-')} | {r.get('mfu_matmul', '-')} | {r['step_s']} | "
                     f"{r.get('peak_gpu_mem_gib', '-')} | {r.get('attention', '-')} |")
    for name, r in sec["rows"].items():
        if "profile" in r:
            lines.append(f"- t. profile of {name}: " + json.dumps(r["profile"]))
    lines.append("\n- t. summary: " + json.dumps(sec.get("summary", {})))
    return lines


if __name__ == "__main__":  # python bench/gpu_throughput.py OUT: this section alone
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(section_throughput(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/gpu_check"), False),
                     indent=2))
