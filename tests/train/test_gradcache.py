"""GradCache gives the same loss and gradients as the uncached step (<= 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_pairs, related_rows, train_cfg, with_teacher
from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine
from qwen3train.train.gradcache import grad_cache_step


def grads_of(engine):
    return {n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k,related", [(0, False), (2, False), (2, True), (2, "teacher"), (2, "hardness")])
def test_gradcache_equals_uncached(tiny_model_dir, tmp_path, k, related):
    """GradCache's loss and gradients equal the uncached step's, also when rows carry pool documents that are
    no negatives of theirs (other positives, not_neg: the masked loss must hold across the cached chunks),
    with distillation from a teacher's scores (each row's own candidates, some rows without scores), and with
    hardness-weighted negatives (weights without gradient: the cached backward must not differentiate them)."""
    data = make_pairs(tmp_path / "d.jsonl", k=max(k, 1))
    if related == "teacher":
        data = with_teacher(related_rows(data))
    cfg = train_cfg(tiny_model_dir, related_rows(data) if related is True else data, tmp_path / "run", k=k,
                    kd_weight=0.5 if related == "teacher" else 0.0)
    task, loader = build_task(cfg, tmp_path / "run")
    if related == "hardness":
        task.loss_fn.hardness = 5.0
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    items = [(i, 0) for i in range(8)]
    batch = loader.collate_items(items, 0)

    engine.optimizer.zero_grad()
    loss_ref, stats_ref = task.loss(task.forward(engine, batch), batch)
    loss_ref.backward()
    ref = grads_of(engine)

    engine.optimizer.zero_grad()
    loss_gc, stats_gc = grad_cache_step(engine, task, batch, task.split(batch, 4))
    got = grads_of(engine)

    assert abs(loss_gc.item() - loss_ref.item()) <= 1e-5
    assert set(got) == set(ref)
    for name in ref:
        scale = max(ref[name].abs().max().item(), 1e-8)
        assert (got[name] - ref[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name
    assert float(stats_gc["acc"]) == pytest.approx(float(stats_ref["acc"]))
    if related == "hardness":  # the weights were live: without them the loss differs
        task.loss_fn.hardness = 0.0
        with torch.no_grad():
            plain, _ = task.loss(task.forward(engine, batch), batch)
        assert abs(loss_ref.item() - plain.item()) > 1e-3
    elif related == "teacher":  # the distillation term was live: rows with and without scores, and it adds
        assert batch.teacher is not None and 0 < torch.isnan(batch.teacher).any(1).sum() < len(batch)
        assert 0 < float(stats_ref["kd_rows"]) < 1 and float(stats_ref["kd"]) > 0
        task.loss_fn.kd_weight = 0.0
        with torch.no_grad():
            plain, _ = task.loss(task.forward(engine, batch), batch)
        assert abs(loss_ref.item() - plain.item() - 0.5 * float(stats_ref["kd"])) <= 1e-5
    elif related:  # the mask was live in this batch: without it the loss differs
        assert batch.not_neg_hash is not None
        task.loss_fn.mask_not_neg = False
        with torch.no_grad():
            blind, _ = task.loss(task.forward(engine, batch), batch)
        assert abs(blind.item() - loss_ref.item()) > 1e-4


def _step_grads(cfg, tmp_path, packing, grad_cache, token_budget, n_micro, rerank=False, prepared=False):
    """One train_step's (loss, gradients, micro batches, packs made during the step) for the first 8 records
    (4 reranker groups); ``prepared``: the batch first went through the data thread's ``prepare_batch``."""
    from qwen3train.train.loop import micro_batches, prepare_batch, train_step

    cfg.model.packing = packing
    task, loader = build_task(cfg, tmp_path / "run")
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    batch = loader.collate_items([(i, 0) for i in range(4 if rerank else 8)], 0)
    if prepared:
        prepare_batch(task, n_micro, token_budget)(batch)
    chunks = micro_batches(task, batch, n_micro, token_budget)
    engine.step = lambda: 0.0  # keep the gradients (no optimizer step, no zeroing)
    model, packs = task.module, []
    pack = model.pack
    model.pack = lambda seqs: packs.append(len(seqs)) or pack(seqs)
    loss, _, _ = train_step(engine, task, batch, n_micro, grad_cache, token_budget)
    return float(loss), grads_of(engine), len(chunks), len(packs)


def _same(a, b, tol=1e-5):
    assert abs(a[0] - b[0]) <= tol * max(1.0, abs(b[0])), (a[0], b[0])
    assert set(a[1]) == set(b[1]) and len(b[1]) > 10
    for name in b[1]:
        scale = max(b[1][name].abs().max().item(), 1e-8)
        assert (a[1][name] - b[1][name]).abs().max().item() <= tol * max(1.0, scale), name


def test_token_budget_gradcache_equals_the_padded_full_batch(tiny_model_dir, tmp_path):
    """Packed forward + GradCache chunks cut by a token budget (uneven row counts) give the loss and
    gradients of one padded, uncached full batch (the in-batch negatives are the whole batch either way).
    Catches a chunk cut that drops or repeats rows and a packed path that differs from the padded one."""
    cfg = train_cfg(tiny_model_dir, make_pairs(tmp_path / "d.jsonl", k=2), tmp_path / "run", k=2,
                    micro=8, global_batch=8)
    ref = _step_grads(cfg, tmp_path, packing=False, grad_cache=False, token_budget=None, n_micro=1)
    got = _step_grads(cfg, tmp_path, packing=True, grad_cache=True, token_budget=90, n_micro=1)
    assert got[2] >= 3  # really several chunks, by tokens
    _same(got, ref)
    assert got[3] == got[2]  # each chunk packed once, not again for GradCache's second pass
    # cut and packed ahead on the data thread (the loop's prepare_batch): the same step, no packing left in it
    ahead = _step_grads(cfg, tmp_path, packing=True, grad_cache=True, token_budget=90, n_micro=1, prepared=True)
    assert ahead[2] == got[2] and ahead[3] == 0
    _same(ahead, ref)


def test_token_budget_micro_batches_leave_the_reranker_loss_unchanged(tiny_model_dir, tmp_path):
    """Reranker groups are independent, so token-budget micro batches without GradCache (each weighted by
    its groups) give the full batch's loss and gradients; with distillation too (each micro batch takes its
    groups' teacher scores: scores of other groups, or none, would change the loss). ``engine.grad_cache=true`` on
    the reranker trains the same way (it used to end the first step in a TypeError: GradCache took the reranker's
    logits tensor for a tuple of towers)."""
    from helpers import rerank_cfg

    data = with_teacher(make_pairs(tmp_path / "d.jsonl", n=32, k=3))
    cfg = rerank_cfg(tiny_model_dir, data, tmp_path / "run", objective="listwise", global_batch=4, micro=4,
                     kd_weight=0.5)
    ref = _step_grads(cfg, tmp_path, packing=True, grad_cache=False, token_budget=None, n_micro=1, rerank=True)
    cfg.loss.kd_weight = 0.0
    assert abs(_step_grads(cfg, tmp_path, packing=True, grad_cache=False, token_budget=None, n_micro=1,
                           rerank=True)[0] - ref[0]) > 1e-4  # the distillation term is live
    cfg.loss.kd_weight = 0.5
    got = _step_grads(cfg, tmp_path, packing=True, grad_cache=False, token_budget=250, n_micro=1, rerank=True)
    assert got[2] >= 2
    _same(got, ref)
    ahead = _step_grads(cfg, tmp_path, packing=True, grad_cache=False, token_budget=250, n_micro=1, rerank=True,
                        prepared=True)
    assert ahead[2] == got[2] and ahead[3] == 0  # packed on the data thread, none in the step
    _same(ahead, ref)
    _same(_step_grads(cfg, tmp_path, packing=True, grad_cache=True, token_budget=250, n_micro=1, rerank=True), ref)
