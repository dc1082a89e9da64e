"""Reranker track: training-time score == score() (== official recipe, see tests/models); each loss
equals an independent computation; the loop trains it and the checkpoints merge."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import helpers
from helpers import make_pairs
from qwen3train.losses.rerank import rerank_loss
from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine
from qwen3train.train.loop import run


def reference(z, objective, temperature=1.0):
    """Loops over hand-built logits (z_no, z_yes, logsumexp)."""
    z = np.asarray(z, dtype=np.float64)
    total, n = 0.0, 0
    for q in range(z.shape[0]):
        s = z[q, :, 1] - z[q, :, 0]
        if objective == "listwise":
            e = np.exp(s / temperature)
            total += -math.log(e[0] / e.sum())
            n += 1
            continue
        for g in range(z.shape[1]):
            label = 1 if g == 0 else 0
            if objective == "binary":
                p = 1 / (1 + math.exp(-s[g]))
                total += -(label * math.log(p) + (1 - label) * math.log(1 - p))
            else:  # sft: -log softmax over the vocabulary at the label token
                total += z[q, g, 2] - (z[q, g, 1] if label else z[q, g, 0])
            n += 1
    return total / n


@pytest.mark.parametrize("objective", ["sft", "binary", "listwise"])
def test_losses_match_independent_computation(objective):
    z = torch.tensor([[[0.1, 2.0, 5.0], [1.0, -0.5, 4.0], [0.3, 0.2, 6.0]],
                      [[2.0, 0.0, 3.5], [-1.0, 1.5, 4.5], [0.0, 0.0, 2.0]]])
    for t in (1.0, 0.5):
        got = rerank_loss(z, objective, temperature=t).item()
        assert abs(got - reference(z, objective, t)) < 1e-6


def test_distillation_adds_the_groups_kl_to_the_objective():
    """RerankLoss with kd_weight: the objective plus kd_weight x KL(softmax(t / kd_temperature) || softmax(s)) over
    each group, s = z_yes - z_no, written out by hand; a group without scores adds 0 (the sum over all groups).
    Would catch the student's probabilities used instead of its logits, or the teacher's temperature left out."""
    from qwen3train.losses.rerank import RerankLoss

    z = torch.tensor([[[0.1, 2.0, 5.0], [1.0, -0.5, 4.0], [0.3, 0.2, 6.0]],
                      [[2.0, 0.0, 3.5], [-1.0, 1.5, 4.5], [0.0, 0.0, 2.0]],
                      [[0.5, 0.5, 3.0], [0.2, 0.9, 3.0], [1.0, -1.0, 3.0]]])
    teacher = torch.tensor([[3.0, -1.0, 0.5], [float("nan")] * 3, [0.0, 2.0, -2.0]])
    for objective in ("sft", "listwise"):
        loss, stats = RerankLoss(objective, kd_weight=0.7, kd_temperature=2.0)(z, teacher)
        kl = 0.0
        for q in (0, 2):
            s = [float(z[q, g, 1] - z[q, g, 0]) for g in range(3)]
            t = [float(x) / 2.0 for x in teacher[q]]
            ls = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
            lt = [x - math.log(sum(math.exp(y) for y in t)) for x in t]
            kl += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
        assert loss.item() == pytest.approx(rerank_loss(z, objective).item() + 0.7 * kl / 3, rel=1e-6)
        assert float(stats["kd"]) == pytest.approx(kl / 3, rel=1e-6) and float(stats["kd_rows"]) == pytest.approx(2 / 3)


def rerank_cfg(tiny_model_dir, tmp_path, objective="sft", **kw):
    return helpers.rerank_cfg(tiny_model_dir, make_pairs(tmp_path / "d.jsonl", n=32, k=3), tmp_path / "r",
                              objective, **kw)


def test_training_score_equals_score(tiny_model_dir, tmp_path):
    cfg = rerank_cfg(tiny_model_dir, tmp_path)
    task, loader = build_task(cfg, tmp_path / "r")
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    items = [(i, 0) for i in range(2)]
    batch = loader.collate_items(items, 0)
    with torch.no_grad():
        z = task.forward(engine, batch)  # [2, 4, 3]
    train_scores = torch.sigmoid(z[..., 1] - z[..., 0]).reshape(-1)
    rec = [loader.source[i] for i, _ in items]
    inference = []
    for r in rec:
        rng = np.random.default_rng([cfg.run.seed, 0, rec.index(r)])
        pick = rng.choice(len(r.neg), size=3, replace=len(r.neg) < 3)
        docs = [r.pos[0]] + [r.neg[int(t)] for t in pick]
        inference.append(task.reranker.score(r.query, docs, instruction=loader.collate.instructions.of(r)))
    assert (train_scores - torch.cat(inference)).abs().max() <= 1e-5


@pytest.mark.slow
def test_rerank_training_then_merge(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qwen3train.merge.apply import merge_folders, select_checkpoints

    cfg = rerank_cfg(tiny_model_dir, tmp_path, objective="binary", max_steps=16, save_every=4, keep_last=0, lr=3e-3)
    final = run(cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    merged = merge_folders(select_checkpoints(tmp_path / "r", last=3, every=1), tmp_path / "m", method="multislerp")
    AutoModelForCausalLM.from_pretrained(merged)  # the official usage loads it
    from qwen3train.models.build import ModelConfig, build_reranker

    rr = build_reranker(ModelConfig(name_or_path=str(merged)), max_length=160)
    probs = rr.score("what is gravity number 1?", ["gravity 1 is described here.", "unrelated text"])
    assert probs.shape == (2,) and torch.isfinite(probs).all()
    assert (final / "config.json").exists()
