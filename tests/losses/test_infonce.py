"""info_nce against an independent, loop-based NumPy computation of the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen3train.losses.infonce import InfoNCELoss, info_nce


def reference(q, p, n, tau, margin, qq, dd, ids, known=None, hardness=0.0):
    """Eq. 1 written term by term, with plain loops (spec §2.1, pool = positives + all negatives); ``known``:
    row -> ids of pool documents that are no negatives of it (dropped from its q-d and d-d terms); ``hardness``:
    each negative term weighted by exp(hardness * its cosine)."""
    known = known or {}
    term = lambda s: math.exp(hardness * s) * math.exp(s / tau)
    q, p = q.astype(np.float64), p.astype(np.float64)
    B = q.shape[0]
    K = 0 if n is None else n.shape[1]
    pool = [p[j] for j in range(B)] + [n[j, k].astype(np.float64) for j in range(B) for k in range(K)]
    ids = list(range(len(pool))) if ids is None else list(ids)
    cos = lambda a, b: float(a @ b)
    losses = []
    for i in range(B):
        s_pos = cos(q[i], p[i])
        thr = math.inf if margin is None else s_pos + margin
        z = math.exp(s_pos / tau)
        for j, d in enumerate(pool):  # q-d terms (2) and (5)
            if j == i:
                continue
            s = cos(q[i], d)
            if s > thr or ids[j] == ids[i] or ids[j] in known.get(i, ()):
                continue
            z += term(s)
        if qq:  # term (3)
            for j in range(B):
                if j == i:
                    continue
                s = cos(q[i], q[j])
                if s > thr:
                    continue
                z += term(s)
        if dd:  # term (4), no margin rule
            for j, d in enumerate(pool):
                if j == i or ids[j] == ids[i] or ids[j] in known.get(i, ()):
                    continue
                z += term(cos(p[i], d))
        losses.append(-math.log(math.exp(s_pos / tau) / z))
    return float(np.mean(losses))


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("qq,dd", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("margin", [0.1, None])
@pytest.mark.parametrize("K", [0, 3])
def test_matches_reference_random(qq, dd, margin, K):
    B, D = 6, 16
    q, p = unit(B, D, seed=1), unit(B, D, seed=2)
    n = unit(B, K, D, seed=3) if K else None
    got = info_nce(q, p, n, temperature=0.05, fn_margin=margin, qq=qq, dd=dd)
    ref = reference(q.numpy(), p.numpy(), None if n is None else n.numpy(), 0.05, margin, qq, dd, None)
    assert abs(got.item() - ref) < 1e-5


def test_margin_mask_hand_built():
    """Query 0's positive has cosine 0.6; a negative at 0.95 (> 0.6 + 0.1) and query 1 at 0.9 are masked,
    a negative at 0.65 (< 0.7) is kept."""
    e = torch.eye(4)
    def v(c):  # unit vector with cosine c to e0
        return c * e[0] + math.sqrt(1 - c * c) * e[1]
    q = torch.stack([e[0], v(0.9)])
    p = torch.stack([v(0.6), e[2]])
    n = torch.stack([torch.stack([v(0.95), v(0.65)]), torch.stack([e[3], -e[3]])])
    tau = 0.1
    loss, stats = info_nce(q, p, n, temperature=tau, fn_margin=0.1, qq=True, dd=False, return_stats=True)
    ref = reference(q.numpy(), p.numpy(), n.numpy(), tau, 0.1, True, False, None)
    assert abs(loss.item() - ref) < 1e-6
    # without the mask the loss for row 0 is larger (the 0.95 negative and the 0.9 query dominate)
    unmasked = info_nce(q, p, n, temperature=tau, fn_margin=None, qq=True, dd=False)
    assert unmasked.item() > loss.item() + 0.5
    # the logged statistics, by hand: 6 of 12 candidates masked (row 0: the 0.95 negative and query 1; row 1,
    # whose positive sits at 0: every document above 0.1 and query 0); row 0 ranks its 0.65 negative first,
    # row 1 its positive (ties at 0 go to the first column); hardest kept negatives 0.65 and 0.0
    assert {k: float(v) for k, v in stats.items()} == pytest.approx(
        {"acc": 0.5, "pos_cos": 0.3, "hardest_neg_cos": 0.325, "fn_masked_frac": 0.5, "margin": -0.025}, abs=1e-6)
    _, alone = info_nce(q[:1], p[:1], None, temperature=tau, fn_margin=0.1, qq=False, dd=False, return_stats=True)
    assert math.isnan(float(alone["hardest_neg_cos"]))  # no negative at all: nan, not 0 and not an error


def test_identical_document_rule():
    """Row 1's hard negative is textually identical to row 0's positive: masked for row 0 (q-d and
    d-d), kept as a negative for row 1."""
    B, K, D = 3, 2, 8
    q, p, n = unit(B, D, seed=5), unit(B, D, seed=6), unit(B, K, D, seed=7)
    n[1, 0] = p[0]
    ids = torch.arange(B * (1 + K))
    ids[B + 1 * K + 0] = ids[0]  # pool order: B positives, then row by row
    got = info_nce(q, p, n, temperature=0.05, fn_margin=None, qq=True, dd=True, doc_ids=ids)
    ref = reference(q.numpy(), p.numpy(), n.numpy(), 0.05, None, True, True, ids.tolist())
    assert abs(got.item() - ref) < 1e-5
    plain = info_nce(q, p, n, temperature=0.05, fn_margin=None, qq=True, dd=True)
    assert abs(got.item() - plain.item()) > 1e-4  # the rule changed something


def test_other_positives_and_not_neg_texts_are_no_negatives_of_their_row():
    """Row 0's record has positives a and b (it trains on a) and not_neg c; row 1 trains on b with c as its
    hard negative. For row 0, b and c are masked (q-d and d-d), as the loop reference drops them; for row 1
    they are its positive and negative as usual. The hashes come from the collator's rule
    (``not_neg_hashes``), the masked loss through ``InfoNCELoss`` and, by rows, ``info_nce``. Would catch
    in-batch documents judged relevant to a query pushed away from it, a mask on the wrong row, or the
    chosen positive masked."""
    from qwen3train.data.collate import not_neg_hashes
    from qwen3train.data.records import Record, doc_hash

    recs = [Record("q0", ["a", "b"], ["x"], not_neg=["c"]), Record("q1", ["b"], ["c"]), Record("q2", ["d"], ["e"])]
    rows = [(i, r, 0) for i, r in enumerate(recs)]
    known = not_neg_hashes(rows)
    assert known.shape == (3, 2) and sorted(known[0].tolist()) == sorted([doc_hash("b"), doc_hash("c")])
    assert (known[1:] == known.min()).all()  # rows 1 and 2: padding only
    assert not_neg_hashes(rows[1:]) is None  # single-positive rows: nothing to mask, nothing built
    B, K, D = 3, 1, 8
    q, p, n = unit(B, D, seed=11), unit(B, D, seed=12), unit(B, K, D, seed=13)
    pos_ids = torch.tensor([doc_hash(r.pos[0]) for r in recs])
    neg_ids = torch.tensor([[doc_hash(r.neg[0])] for r in recs])
    ids = torch.cat([pos_ids, neg_ids.reshape(-1)]).tolist()
    ref = reference(q.numpy(), p.numpy(), n.numpy(), 0.05, None, True, True, ids,
                    known={0: {doc_hash("b"), doc_hash("c")}})
    loss = InfoNCELoss(0.05, fn_margin=None)
    got, _ = loss(q, p, n, pos_ids, neg_ids, not_neg_ids=known)
    assert abs(got.item() - ref) < 1e-5
    blind, _ = InfoNCELoss(0.05, fn_margin=None, mask_not_neg=False)(q, p, n, pos_ids, neg_ids, not_neg_ids=known)
    assert abs(blind.item() - reference(q.numpy(), p.numpy(), n.numpy(), 0.05, None, True, True, ids)) < 1e-5
    assert abs(blind.item() - got.item()) > 1e-4
    # a rank's own rows against the whole pool (the cross-device case): the mask of those rows only
    from qwen3train.losses.infonce import known_mask

    mask = known_mask(torch.tensor(ids), known)
    parts = [info_nce(q, p, n, temperature=0.05, fn_margin=None, doc_ids=torch.tensor(ids), rows=torch.arange(a, b),
                      no_neg=mask[a:b]) * (b - a) for a, b in ((0, 1), (1, 3))]
    assert abs(sum(x.item() for x in parts) / 3 - ref) < 1e-5


@pytest.mark.parametrize("qq,dd,K", [(True, True, 3), (False, False, 0), (True, False, 2)])
def test_hardness_weighting_matches_the_weighted_sum_and_takes_no_gradient_through_its_weights(qq, dd, K):
    """loss.hardness_strength = a: every negative term of Z_i (each block, each mask rule kept) weighted by
    exp(a * cosine), the positive's not: value against the loop reference; gradient against autograd through
    an explicit sum whose weights are detached. Catches a weight on the positive, a block left unweighted, a
    weight that reaches a masked term, and gradient through the weights (which is a sharper temperature on the
    negatives, a different gradient: checked to differ)."""
    B, D, a, tau = 6, 16, 5.0, 0.05
    q, p = unit(B, D, seed=21), unit(B, D, seed=22)
    n = unit(B, K, D, seed=23) if K else None
    ids = torch.tensor(list(range(B)) + [1] + list(range(B + 1, B * (1 + K)))) if K else None  # a duplicate of d_1+
    got = info_nce(q, p, n, temperature=tau, fn_margin=0.1, qq=qq, dd=dd, doc_ids=ids, hardness=a)
    ref = reference(q.numpy(), p.numpy(), None if n is None else n.numpy(), tau, 0.1, qq, dd,
                    None if ids is None else ids.tolist(), hardness=a)
    assert abs(got.item() - ref) < 1e-4 * abs(ref) and abs(ref - reference(
        q.numpy(), p.numpy(), None if n is None else n.numpy(), tau, 0.1, qq, dd,
        None if ids is None else ids.tolist())) > 0.03  # (the weights act: random cosines are near 0)

    def explicit(qv, pv, detached):
        pool = pv if K == 0 else torch.cat([pv, n.reshape(B * K, D)])
        pid = torch.arange(pool.shape[0]) if ids is None else ids
        total = 0.0
        for i in range(B):
            s_pos = qv[i] @ pv[i]
            terms = [(qv[i] @ pool[j], False) for j in range(pool.shape[0])
                     if j != i and pid[j] != pid[i] and (qv[i] @ pool[j]).item() <= s_pos.item() + 0.1]
            terms += [(qv[i] @ qv[j], False) for j in range(B) if qq and j != i and (qv[i] @ qv[j]).item()
                      <= s_pos.item() + 0.1]
            terms += [(pv[i] @ pool[j], False) for j in range(pool.shape[0]) if dd and j != i and pid[j] != pid[i]]
            z = torch.exp(s_pos / tau) + sum(torch.exp(a * (s.detach() if detached else s)) * torch.exp(s / tau)
                                             for s, _ in terms)
            total = total - torch.log(torch.exp(s_pos / tau) / z)
        return total / B

    grads = {}
    for name, fn in (("ours", lambda qv, pv: info_nce(qv, pv, n, temperature=tau, fn_margin=0.1, qq=qq, dd=dd,
                                                      doc_ids=ids, hardness=a)),
                     ("detached", lambda qv, pv: explicit(qv, pv, True)),
                     ("through", lambda qv, pv: explicit(qv, pv, False))):
        qv, pv = q.clone().double().requires_grad_(), p.clone().double().requires_grad_()
        if n is not None:
            n = n.double()
        fn(qv, pv).backward()
        grads[name] = torch.cat([qv.grad.flatten(), pv.grad.flatten()])
        n = None if n is None else n.float()
    assert torch.allclose(grads["ours"], grads["detached"], atol=1e-8, rtol=1e-6)
    assert not torch.allclose(grads["ours"], grads["through"], atol=1e-3)


def test_rows_subset_and_equivalence_to_standard_infonce():
    B, D = 8, 16
    q, p = unit(B, D, seed=8), unit(B, D, seed=9)
    full = info_nce(q, p, temperature=0.05, fn_margin=None, qq=False, dd=False)
    std = F.cross_entropy(q @ p.T / 0.05, torch.arange(B))  # MNRL with scale 20
    assert abs(full.item() - std.item()) < 1e-5
    halves = [info_nce(q, p, temperature=0.05, rows=torch.arange(s, s + 4)) for s in (0, 4)]
    assert abs(sum(h.item() for h in halves) / 2 - info_nce(q, p, temperature=0.05).item()) < 1e-6


def test_gradient_only_flows_through_unmasked_terms():
    B, D = 4, 8
    q = unit(B, D, seed=10).requires_grad_()
    p = unit(B, D, seed=11).requires_grad_()
    loss = info_nce(q, p, temperature=0.05)
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()


def test_matryoshka_sum_over_dims():
    B, H = 5, 32
    g = torch.Generator().manual_seed(3)
    q, p = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    loss_fn = InfoNCELoss(0.05, matryoshka_dims=[8, 16], matryoshka_weights=[0.5, 2.0], cross_device=False)
    got, _ = loss_fn(q, p, None)
    parts = [info_nce(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), temperature=0.05)
             for d in (H, 8, 16)]
    assert abs(got.item() - (parts[0] + 0.5 * parts[1] + 2.0 * parts[2]).item()) < 1e-5


def test_distillation_matches_a_loop_over_rows_and_adds_to_the_loss():
    """The distillation term (loss.kd_weight) against KL(teacher || student) written row by row in float64:
    softmax of the teacher's scores / kd_temperature, of the student's cosines / temperature, over the row's
    own positive and K negatives; a row without scores (NaN) adds 0 and the sum is over all rows. Would catch
    a missing temperature, the KL's arguments swapped, the in-batch pool used instead of the row's group, or a
    mean over the scored rows only."""
    from qwen3train.losses.infonce import distill

    g = torch.Generator().manual_seed(3)
    B, K, D, tau, t_tau = 5, 3, 8, 0.05, 2.0
    q, p, n = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, K, D, generator=g)
    teacher = torch.randn(B, 1 + K, generator=g) * 3
    teacher[2] = float("nan")
    qn, pn, nn = (F.normalize(x.double(), dim=-1) for x in (q, p, n))
    want = 0.0
    for i in range(B):
        if i == 2:
            continue
        s = [float(qn[i] @ pn[i]) / tau] + [float(qn[i] @ nn[i, k]) / tau for k in range(K)]
        t = [float(x) / t_tau for x in teacher[i]]
        ls = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
        lt = [x - math.log(sum(math.exp(y) for y in t)) for x in t]
        want += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    got, frac = distill(F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1), teacher,
                        temperature=tau, teacher_temperature=t_tau)
    assert got.item() == pytest.approx(want / B, rel=1e-5) and frac.item() == pytest.approx(4 / 5)
    plain = InfoNCELoss(tau)(q, p, n)[0]
    with_kd, stats = InfoNCELoss(tau, kd_weight=0.3, kd_temperature=t_tau)(q, p, n, teacher=teacher)
    assert with_kd.item() == pytest.approx(plain.item() + 0.3 * want / B, rel=1e-5)
    assert float(stats["kd"]) == pytest.approx(want / B, rel=1e-5)
    agree = teacher.clone()
    agree[:, :] = torch.einsum("bd,bkd->bk", F.normalize(q, dim=-1),
                               torch.cat([F.normalize(p, dim=-1).unsqueeze(1), F.normalize(n, dim=-1)], 1)) / tau
    assert distill(F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1), agree, temperature=tau,
                   teacher_temperature=1.0)[0].item() == pytest.approx(0.0, abs=1e-6)  # the student is the teacher
