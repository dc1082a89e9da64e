"""GradCache gives the same loss and gradients as the uncached step (<= 1e-5)."""

from __future__ import annotations

import pytest

from helpers import make_pairs, train_cfg
from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine
from qwen3train.train.gradcache import grad_cache_step


def grads_of(engine):
    return {n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [0, 2])
def test_gradcache_equals_uncached(tiny_model_dir, tmp_path, k):
    cfg = train_cfg(tiny_model_dir, make_pairs(tmp_path / "d.jsonl", k=max(k, 1)), tmp_path / "run", k=k)
    task, loader = build_task(cfg, tmp_path / "run")
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    items = [(i, 0) for i in range(8)]
    batch = loader.collate_items(items, 0)

    engine.optimizer.zero_grad()
    loss_ref, stats_ref = task.loss(task.forward(engine, batch), batch)
    loss_ref.backward()
    ref = grads_of(engine)

    engine.optimizer.zero_grad()
    loss_gc, stats_gc = grad_cache_step(engine, task, batch, n_chunks=4)
    got = grads_of(engine)

    assert abs(loss_gc.item() - loss_ref.item()) <= 1e-5
    assert set(got) == set(ref)
    for name in ref:
        scale = max(ref[name].abs().max().item(), 1e-8)
        assert (got[name] - ref[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name
    assert stats_gc["acc"] == pytest.approx(stats_ref["acc"])
