"""The merge's dev gate (merge.confidence): a paired bootstrap over per-query dev scores. A 120-query dev
split once kept a merge that led by +0.004 and lost 0.014 on the evaluation sets; the gate must refuse
such a lead when it is within the queries' noise, and still keep a consistent one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qwen3train.eval.metrics import evaluate_run, paired_bootstrap
from qwen3train.merge.run import merge_pays


def exact_p_better(d: list[float]) -> float:
    """P(mean of a with-replacement resample of d > 0), by enumerating all n^n resamples."""
    n = len(d)
    wins = sum(sum(d[i] for i in pick) > 0 for pick in itertools.product(range(n), repeat=n))
    return wins / n ** n


@pytest.mark.parametrize("d", [[1.0, -1.0, 0.5], [0.25, -0.5, 0.125, 0.375], [0.0, -0.125, 0.5, -0.25, 0.0625]])
def test_bootstrap_matches_exact_enumeration(d):
    """Against an independent computation (values exact in binary, so ties stay ties): the resampling must draw queries in pairs (a bug that resampled
    the two systems independently, or compared medians, gives another probability)."""
    a = [0.5 + x for x in d]
    b = [0.5] * len(d)
    assert paired_bootstrap(a, b, samples=40000, seed=1) == pytest.approx(exact_p_better(d), abs=0.01)


def test_pairing_matters():
    """Same per-query values in another query order: unpaired, the lead would look like noise; paired, every
    query gains 0.01, so the merge is better in every resample."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    assert paired_bootstrap(base + 0.01, base, 1000) == 1.0
    assert paired_bootstrap(base, base + 0.01, 1000) == 0.0


def test_gate_refuses_a_noisy_lead_and_keeps_a_consistent_one():
    rng = np.random.default_rng(0)
    inp = rng.uniform(0, 1, 120)
    noisy = inp + rng.normal(0.004, 0.2, 120)  # mean lead of about +0.004, per-query noise 0.2
    noisy += 0.004 - (noisy - inp).mean()
    keep0, p = merge_pays(list(noisy), list(inp), confidence=0.0)
    assert keep0 and 0.3 < p < 0.8  # without the gate, the higher mean wins
    keep, _ = merge_pays(list(noisy), list(inp), confidence=0.9)
    assert not keep
    steady = inp + rng.uniform(0.0, 0.02, 120)
    assert merge_pays(list(steady), list(inp), confidence=0.9) == (True, 1.0)
    assert merge_pays(list(inp - 0.01), list(inp), confidence=0.0)[0] is False  # a lower mean never wins


def test_per_query_values_follow_the_mean():
    run = {"q1": [("d1", 2.0), ("d2", 1.0)], "q2": [("d2", 2.0), ("d1", 1.0)], "q3": [("d1", 1.0)]}
    qrels = {"q1": {"d1": 1}, "q2": {"d1": 1}, "q3": {"d9": 0}}  # q3 has no positive: not counted
    got = evaluate_run(run, qrels, per_query=True)
    assert got["per_query"]["mrr@10"] == [1.0, 0.5] and got["queries"] == 2
    assert got["mrr@10"] == pytest.approx(0.75)
