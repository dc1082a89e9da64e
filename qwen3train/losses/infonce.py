"""The Qwen3-Embedding improved InfoNCE (paper Eq. 1, 5-term version; spec §2).

For anchor query i, with the document pool D = every positive and every hard negative of the batch
(gathered across ranks), the loss is -log(exp(s(q_i, d_i+)/tau) / Z_i) with

    Z_i = exp(s(q_i, d_i+)/tau)
        + sum_k  m_ik exp(s(q_i, d_ik-)/tau)     (2) own hard negatives          \\  the q-d block:
        + sum_j  m_ij exp(s(q_i, d_j)/tau)       (5) other pool documents         /  q_i vs all of D
        + sum_j!=i m_ij exp(s(q_i, q_j)/tau)     (3) other queries               -- the q-q block
        + sum_j  m_ij exp(s(d_i+, d_j)/tau)      (4) pool documents vs d_i+       -- the d-d block

and the false-negative mask m = 0 when
  - (q-d and q-q) the candidate's cosine exceeds s(q_i, d_i+) + fn_margin (threshold detached;
    margin on raw cosine, before dividing by tau); or
  - (q-d and d-d) the pool document is identical to d_i+ (``doc_ids`` equal), other than d_i+ itself; or
  - (q-d and d-d) the pool document is known to be no negative of row i (``no_neg``: another positive of
    its record, or one of its ``not_neg`` texts, e.g. a document judged partly relevant).
The d-d block has no margin rule (spec §2.3, as ms-swift's "align with Qwen3-Embedding"), and
excludes d_i+ itself. With ``hardness`` = a > 0 (not in the paper; EmbeddingGemma's hardness weighting,
sentence-transformers' ``hardness_strength``), each negative term of every block is weighted by
w = exp(a * s) with s its cosine and no gradient through w: harder negatives count more in Z_i.
Implemented as one cross-entropy over the concatenated logits [S_qd | S_qq | S_dd] / tau with masked
entries at -inf and the target at d_i+'s column (spec §2.4).

Inputs (L2-normalised):

    ====================  ==============  =============================================
    q                     [B, D]          queries
    pos                   [B, D]          one positive per query
    neg                   [B, K, D]       K hard negatives per query (or None: K = 0)
    doc_ids               [B*(1+K)]       ids in pool order: B positives, then row by row
                                          the K negatives of each row (e.g. text hashes)
    rows                  [R] LongTensor  anchors to compute the loss for (default: all).
                                          Cross-device: the rank's own rows of the gathered
                                          batch, so labels are offset by rank.
    no_neg                [R, P] bool     pool documents that are no negatives of each anchor
                                          (``known_mask``), or None
    ====================  ==============  =============================================

Relations: with ``qq=False, dd=False, fn_margin=None`` and no ``doc_ids`` this is the standard
in-batch + hard-negative InfoNCE (sentence-transformers' MultipleNegativesRankingLoss with
scale = 1/temperature).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qwen3train import dist
from qwen3train.models.pooling import normalize

NEG_INF = float("-inf")


def info_nce(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None, *,
             temperature: float, fn_margin: float | None = 0.1, qq: bool = True, dd: bool = True,
             doc_ids: torch.Tensor | None = None, rows: torch.Tensor | None = None,
             no_neg: torch.Tensor | None = None, hardness: float = 0.0, return_stats: bool = False):
    """Mean loss over ``rows`` (see the module docstring); with ``return_stats`` also a dict of
    detached telemetry: top-1 accuracy, mean positive cosine, mean hardest-negative cosine, margin
    and the fraction of q-d/q-q candidates masked as false negatives."""
    B, D = q.shape
    K = 0 if neg is None else neg.shape[1]
    pool = pos if K == 0 else torch.cat([pos, neg.reshape(B * K, D)])  # [P, D], P = B(1+K)
    if rows is None:
        rows = torch.arange(B, device=q.device)
    R = rows.numel()
    ar = torch.arange(R, device=q.device)
    target = rows  # d_i+ sits in column i of the pool

    s_qd = q[rows] @ pool.T  # [R, P]
    s_pos = s_qd[ar, target]  # [R]
    is_target = torch.zeros_like(s_qd, dtype=torch.bool)
    is_target[ar, target] = True

    drop_qd = torch.zeros_like(is_target)
    if fn_margin is not None:
        thr = (s_pos.detach() + fn_margin).unsqueeze(1)  # [R, 1]
        drop_qd |= s_qd.detach() > thr
    not_neg_doc = None
    if doc_ids is not None:
        if doc_ids.numel() != pool.shape[0]:
            raise ValueError(f"doc_ids has {doc_ids.numel()} ids, the pool has {pool.shape[0]} documents")
        not_neg_doc = doc_ids.unsqueeze(0) == doc_ids[target].unsqueeze(1)  # [R, P]
    if no_neg is not None:
        not_neg_doc = no_neg if not_neg_doc is None else not_neg_doc | no_neg
    if not_neg_doc is not None:
        drop_qd |= not_neg_doc
    drop_qd &= ~is_target
    blocks = [s_qd.masked_fill(drop_qd, NEG_INF)]
    n_cand = is_target.numel() - R
    n_drop = drop_qd.sum()  # a tensor: statistics are read once per step (train.loop.train_step), not here

    if qq:
        s_qq = q[rows] @ q.T  # [R, B]
        drop_qq = torch.zeros_like(s_qq, dtype=torch.bool)
        drop_qq[ar, rows] = True  # self
        n_cand += s_qq.numel() - R
        if fn_margin is not None:
            over = s_qq.detach() > thr
            over[ar, rows] = False
            n_drop = n_drop + over.sum()
            drop_qq |= over
        blocks.append(s_qq.masked_fill(drop_qq, NEG_INF))
    if dd:
        s_dd = pos[rows] @ pool.T  # [R, P]
        drop_dd = is_target.clone()  # d_i+ against itself
        if not_neg_doc is not None:
            drop_dd |= not_neg_doc
        blocks.append(s_dd.masked_fill(drop_dd, NEG_INF))

    logits = torch.cat(blocks, dim=1) / temperature
    if hardness:  # log w = a * s added to each negative's logit (masked ones stay -inf), the positive's left
        boost = hardness * torch.cat([s_qd] + ([s_qq] if qq else []) + ([s_dd] if dd else []), dim=1).detach()
        boost[ar, target] = 0.0
        logits = logits + boost
    loss = F.cross_entropy(logits, target)
    if not return_stats:
        return loss
    with torch.no_grad():
        cand = s_qd.detach().masked_fill(drop_qd | is_target, NEG_INF)
        hardest = cand.max(dim=1).values if cand.shape[1] > 1 else torch.full_like(s_pos, float("nan"))
        acc = (s_qd.detach().masked_fill(drop_qd, NEG_INF).argmax(dim=1) == target).float().mean()
        finite = torch.isfinite(hardest)
        # 0-d tensors, no host synchronisation (a GPU step would wait here before its backward)
        stats = {
            "acc": acc,
            "pos_cos": s_pos.detach().mean(),
            "hardest_neg_cos": torch.where(finite, hardest, 0.0).sum() / finite.sum(),  # 0/0: nan when none
            "fn_masked_frac": n_drop.float() / max(n_cand, 1),
        }
        stats["margin"] = stats["pos_cos"] - stats["hardest_neg_cos"]
    return loss, stats


def distill(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, teacher: torch.Tensor, *,
            temperature: float, teacher_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation from a teacher's scores (not in the paper; FlagEmbedding's ``kl_div``, as a KL divergence):
    per row, KL(softmax(t / teacher_temperature) || softmax(s / temperature)) over its own candidates, its
    positive and its K negatives, ``s`` the student's cosines (L2-normalised inputs) and ``t`` the teacher's
    scores (``[B, 1 + K]``). A row whose teacher scores are NaN (none) adds 0. The sum is divided by the number
    of rows, not of scored rows: each rank's share of a batch split over ranks then adds up to the mean over
    the global batch, whatever the ranks hold. Returns (loss, fraction of rows with a teacher)."""
    cand = pos.unsqueeze(1) if neg is None else torch.cat([pos.unsqueeze(1), neg], dim=1)  # [B, 1 + K, D]
    return soft_target_kl(torch.einsum("bd,bkd->bk", q, cand) / temperature, teacher, teacher_temperature)


def soft_target_kl(student: torch.Tensor, teacher: torch.Tensor, teacher_temperature: float):
    """Sum over rows of KL(softmax(teacher / teacher_temperature) || softmax(student)), ``[R, G]`` logits each,
    rows whose teacher holds a NaN left out, divided by R; and the fraction of rows with a teacher. The
    embedder's distillation (``distill``) and the reranker's (``losses.rerank``) both take it."""
    student = F.log_softmax(student, dim=1)
    have = ~torch.isnan(teacher).any(dim=1)
    target = F.log_softmax(teacher.masked_fill(~have.unsqueeze(1), 0.0).to(student.dtype) / teacher_temperature, 1)
    kl = (target.exp() * (target - student)).sum(dim=1)
    return torch.where(have, kl, 0.0).sum() / max(student.shape[0], 1), have.float().mean()


def known_mask(pool_ids: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor | None:
    """``[R, P]``: pool document p is among row r's ``row_ids`` (``[R, M]`` text hashes, padded with a value no
    pool document has). Only the pool columns holding any of the hashes are compared element-wise, so the cost
    is that of ``isin`` over the pool, not R x P x M. None when no pool document is among them."""
    cols = torch.isin(pool_ids, row_ids.flatten()).nonzero().squeeze(1)
    if cols.numel() == 0:
        return None
    hit = (pool_ids[cols].view(1, -1, 1) == row_ids.unsqueeze(1)).any(-1)  # [R, C]
    out = torch.zeros(row_ids.shape[0], pool_ids.numel(), dtype=torch.bool, device=pool_ids.device)
    out[:, cols] = hit
    return out


@dataclass
class InfoNCEConfig:
    """Hyper-parameters of the improved InfoNCE.

    temperature: UNCONFIRMED in the paper (spec §2.3); 0.05 here for contrastive training from an LLM
        (spec recommends 0.02-0.05), ms-swift uses 0.1 for fine-tuning released checkpoints.
    fn_margin: the paper's 0.1 false-negative margin; null disables the margin rule.
    mask_not_neg: a pool document that is another positive of a row's record, or among its ``not_neg``
        texts, is no negative of that row (masked in the q-d and d-d blocks). Not in the paper (its records
        have one positive); false only to reproduce a loss that treats them as negatives.
    matryoshka_dims: dims the loss is also computed at (truncate, then normalise); empty = full only.
        The paper's MRL set is UNCONFIRMED (spec §1.6); the full dim is always included.
    cross_device: gather embeddings from every rank (gradient kept on each rank's own slice).
    kd_weight: weight of the distillation term (``distill``) from the records' teacher scores (``pos_scores``,
        ``neg_scores``: FlagEmbedding's fields; ``make score`` writes them). Not in the paper: 0 (off) by
        default. Records without scores train on InfoNCE alone.
    kd_temperature: the teacher's scores are divided by it before their softmax: 1 for a reranker's logits
        (FlagEmbedding's setting), about the student's temperature for an embedder teacher's cosines.
    hardness_strength: a >= 0; each negative term of the denominator weighted by exp(a * its cosine), without
        gradient through the weight (EmbeddingGemma's hardness weighting, a = 5 there; sentence-transformers'
        ``hardness_strength``). Not in the paper: 0 (off) by default.
    """

    name: str = "infonce"
    temperature: float = 0.05
    fn_margin: float | None = 0.1
    qq: bool = True
    dd: bool = True
    mask_identical_docs: bool = True
    mask_not_neg: bool = True
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)
    cross_device: bool = True
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    hardness_strength: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.hardness_strength < 0:
            raise ValueError(f"loss.hardness_strength must be >= 0 (0: off), got {self.hardness_strength}")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise ValueError(f"loss.kd_weight must be >= 0 and loss.kd_temperature > 0, got {self.kd_weight} and "
                             f"{self.kd_temperature}")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError("loss.matryoshka_weights must be empty or as long as loss.matryoshka_dims")


class InfoNCELoss:
    """Applies ``info_nce`` to *un-normalised* pooled vectors: optional cross-device gather, then
    the (weighted) sum over Matryoshka dims of the loss on truncated, re-normalised vectors."""

    def __init__(self, temperature: float, fn_margin: float | None = 0.1, qq: bool = True, dd: bool = True,
                 mask_identical_docs: bool = True, matryoshka_dims: list[int] | None = None,
                 matryoshka_weights: list[float] | None = None, cross_device: bool = True,
                 mask_not_neg: bool = True, kd_weight: float = 0.0, kd_temperature: float = 1.0,
                 hardness_strength: float = 0.0) -> None:
        self.temperature, self.hardness = temperature, hardness_strength
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.mask_not_neg = mask_not_neg
        self.fn_margin = fn_margin
        self.qq, self.dd = qq, dd
        self.mask_identical_docs = mask_identical_docs
        dims = list(matryoshka_dims or [])
        weights = list(matryoshka_weights or [1.0] * len(dims))
        self.dims: list[tuple[int | None, float]] = [(None, 1.0)] + [
            (d, w) for d, w in zip(dims, weights)]
        self.cross_device = cross_device

    def __call__(self, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None,
                 pos_ids: torch.Tensor | None = None, neg_ids: torch.Tensor | None = None,
                 not_neg_ids: torch.Tensor | None = None, teacher: torch.Tensor | None = None):
        """q, pos: [b, H]; neg: [b, K, H] (this rank's rows); ids: [b] and [b, K]; ``not_neg_ids``: [b, M]
        hashes of the texts that are no negatives of each row (``data.collate.not_neg_hashes``); ``teacher``:
        [b, 1 + K] a teacher's scores (``kd_weight``). Returns (loss for this rank's rows, stats at the full dim)."""
        kd = None
        if self.kd_weight and teacher is not None:  # each row's own candidates: this rank's rows, not gathered
            kd = distill(normalize(q), normalize(pos), normalize(neg) if neg is not None else None, teacher,
                         temperature=self.temperature, teacher_temperature=self.kd_temperature)
        rows = None
        if self.cross_device and dist.world_size() > 1:
            b = q.shape[0]
            q, pos = dist.all_gather_with_grad(q), dist.all_gather_with_grad(pos)
            neg = dist.all_gather_with_grad(neg) if neg is not None else None
            if pos_ids is not None:
                pos_ids = dist.all_gather_nograd(pos_ids)
                neg_ids = dist.all_gather_nograd(neg_ids) if neg_ids is not None else None
            start = dist.rank() * b
            rows = torch.arange(start, start + b, device=q.device)
        pool_ids = pos_ids
        if pos_ids is not None and neg_ids is not None:
            pool_ids = torch.cat([pos_ids, neg_ids.reshape(-1)])
        doc_ids = pool_ids if self.mask_identical_docs else None
        # the rows' own hashes: the mask is for this rank's rows against the gathered pool, nothing to gather
        no_neg = (known_mask(pool_ids, not_neg_ids) if self.mask_not_neg and not_neg_ids is not None
                  and pool_ids is not None else None)
        total, stats = 0.0, {}
        for dim, weight in self.dims:
            out = info_nce(normalize(q, dim), normalize(pos, dim),
                           normalize(neg, dim) if neg is not None else None,
                           temperature=self.temperature, fn_margin=self.fn_margin, qq=self.qq, dd=self.dd,
                           doc_ids=doc_ids, rows=rows, no_neg=no_neg, hardness=self.hardness,
                           return_stats=dim is None)
            if dim is None:
                out, stats = out
            total = total + weight * out
        if kd is not None:
            total = total + self.kd_weight * kd[0]
            stats = stats | {"kd": kd[0].detach(), "kd_rows": kd[1]}
        return total, stats


def build_infonce(cfg: InfoNCEConfig) -> InfoNCELoss:
    return InfoNCELoss(cfg.temperature, cfg.fn_margin, cfg.qq, cfg.dd, cfg.mask_identical_docs,
                       cfg.matryoshka_dims, cfg.matryoshka_weights, cfg.cross_device, cfg.mask_not_neg,
                       cfg.kd_weight, cfg.kd_temperature, cfg.hardness_strength)
