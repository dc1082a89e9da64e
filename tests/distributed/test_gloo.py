"""A 2-process gloo run gives the same loss and gradients as one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
from helpers import make_pairs, rerank_cfg, train_cfg  # noqa: E402


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tiny_model_dir, tmp_path):
    data = make_pairs(tmp_path / "d.jsonl", k=2)
    out = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS / "train"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "distributed" / "gloo_worker.py"), str(TESTS / "train"), str(tiny_model_dir), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out, weights_only=False)

    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run1", k=2, global_batch=8, micro=8)
    task = build_task(cfg, tmp_path / "run1")
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    batch = task.prepare([(i, 0) for i in range(8)], epoch=0)
    loss, _ = task.loss(task.forward(engine, batch), batch)
    loss.backward()
    ref = {n: p.grad for n, p in engine.module.named_parameters()}
    for mode in ("plain", "gradcache"):
        loss2, grads2 = two[mode]
        assert abs(loss2 - loss.item()) <= 1e-5, mode
        for n, g in ref.items():
            assert (grads2[n] - g).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), (mode, n)

    # reranker: one process on the 4 queries == 2 processes with 2 each (DDP averages the gradients)
    rcfg = rerank_cfg(tiny_model_dir, data, tmp_path / "rr1", global_batch=4, micro=4)
    rtask = build_task(rcfg, tmp_path / "rr1")
    rengine = TorchEngine(rtask.module, rcfg.engine, rcfg.optim, 10)
    rbatch = rtask.prepare([(i, 0) for i in range(4)], epoch=0)
    rloss, _ = rtask.loss(rtask.forward(rengine, rbatch), rbatch)
    rloss.backward()
    loss2, grads2 = two["rerank"]
    assert abs(loss2 - rloss.item()) <= 1e-5
    for n, p in rengine.module.named_parameters():
        if p.grad is not None:
            assert (grads2[n] - p.grad).abs().max().item() <= 1e-5 * max(1.0, p.grad.abs().max().item()), n
