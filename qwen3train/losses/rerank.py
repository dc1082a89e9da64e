"""Reranker losses over a query's group (one positive, then n negatives), from the logits the
scoring uses: ``z_no``, ``z_yes`` at the last position, and (``sft``) the full-vocabulary
log-normaliser there. Inference scores ``sigmoid(z_yes - z_no)`` (spec §3.3) for all three.

    sft       (paper Eq. 2)  -log p(label token | prompt) over the whole vocabulary:
              lse - z_yes for the positive, lse - z_no for each negative; mean over rows
    binary    BCE-with-logits on s = z_yes - z_no (= cross-entropy over the 2-way {no, yes} softmax)
    listwise  cross-entropy over the group of s / temperature, the positive as target

Inputs: ``z`` ``[Q, G, 2 or 3]`` (G = 1 + n, positive first). Which variant Qwen used is UNCONFIRMED
(spec §3.4); ``sft`` is the default for paper fidelity.

Distillation (not in the paper; ``kd_weight`` > 0): plus ``kd_weight`` x KL(softmax(t / kd_temperature) ||
softmax(s)) over the group, ``t`` a teacher's scores of its texts (the records' ``pos_scores``/``neg_scores``,
e.g. a larger reranker's logits from ``make score``); a group without scores adds 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from qwen3train.errors import ConfigError

OBJECTIVES = ("sft", "binary", "listwise")


def rerank_loss(z: torch.Tensor, objective: str, temperature: float = 1.0) -> torch.Tensor:
    q, g = z.shape[:2]
    s = z[..., 1] - z[..., 0]  # [Q, G]
    labels = torch.zeros((q, g), device=z.device)
    labels[:, 0] = 1.0
    if objective == "binary":
        return F.binary_cross_entropy_with_logits(s, labels)
    if objective == "listwise":
        return F.cross_entropy(s / temperature, torch.zeros(q, dtype=torch.long, device=z.device))
    if objective == "sft":
        if z.shape[-1] < 3:
            raise ValueError("the sft objective needs the full-vocabulary logsumexp column")
        target = torch.where(labels.bool(), z[..., 1], z[..., 0])
        return (z[..., 2] - target).mean()
    raise ConfigError(f"unknown reranker objective {objective!r}; known: {OBJECTIVES}")


@dataclass
class RerankLossConfig:
    """objective: sft (paper), binary or listwise; temperature applies to listwise only."""

    name: str = "rerank"
    objective: str = "sft"
    temperature: float = 1.0
    kd_weight: float = 0.0  # distillation from the records' teacher scores (not in the paper): 0 = off
    kd_temperature: float = 1.0  # the teacher's scores are divided by it before their softmax

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"loss.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise ValueError(f"loss.kd_weight must be >= 0 and loss.kd_temperature > 0, got {self.kd_weight} and "
                             f"{self.kd_temperature}")


class RerankLoss:
    def __init__(self, objective: str, temperature: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0) -> None:
        self.objective, self.temperature = objective, temperature
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.needs_logsumexp = objective == "sft"

    def __call__(self, z: torch.Tensor, teacher: torch.Tensor | None = None):
        """``teacher``: ``[Q, G]`` a teacher's scores of each group's texts (NaN: none), for ``kd_weight``."""
        loss = rerank_loss(z, self.objective, self.temperature)
        s = z[..., 1] - z[..., 0]
        kd = None
        if self.kd_weight and teacher is not None:
            from qwen3train.losses.infonce import soft_target_kl

            kd = soft_target_kl(s.float(), teacher, self.kd_temperature)
            loss = loss + self.kd_weight * kd[0]
        with torch.no_grad():
            s = s.detach()
            stats = {"acc": (s[:, 0:1] > s[:, 1:]).all(dim=1).float().mean(),  # 0-d tensors, read once a step
                     "pos_prob": torch.sigmoid(s[:, 0]).mean(),
                     "neg_prob": torch.sigmoid(s[:, 1:]).mean() if s.shape[1] > 1 else s.new_tensor(float("nan"))}
            if kd is not None:
                stats |= {"kd": kd[0].detach(), "kd_rows": kd[1]}
        return loss, stats


def build_rerank_loss(cfg: RerankLossConfig) -> RerankLoss:
    return RerankLoss(cfg.objective, cfg.temperature, cfg.kd_weight, cfg.kd_temperature)
