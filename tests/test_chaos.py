"""kill -9 during the smoke pipeline, then rerun: the outputs equal an uninterrupted run's, and no stage is
ever marked done without its outputs (a fixed set of kills, mid-training and mid-evaluation; bench/chaos.py
draws many at random, in every stage)."""

from __future__ import annotations

import json
import random
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def smoke_inputs(tmp_path_factory, tiny_model_dir):
    """What configs/smoke.yaml reads (bench/chaos.py ``smoke_inputs``), the tiny model as backbone and generator."""
    import chaos

    return chaos.smoke_inputs(tmp_path_factory.mktemp("smoke-data"), tiny_model_dir)


@pytest.mark.slow
def test_kills_in_three_stages_then_rerun_equal_the_uninterrupted_run(smoke_inputs, tmp_path):
    import chaos

    log = open(tmp_path / "chaos.log", "w")
    rc, _ = chaos.run(tmp_path / "ref", smoke_inputs, log=log)
    assert rc == 0, (tmp_path / "chaos.log").read_text()[-3000:]
    ref, windows = chaos.fingerprint(tmp_path / "ref"), chaos.stage_windows(tmp_path / "ref")
    assert all(v is not None for v in ref.values()), ref
    report = json.loads((tmp_path / "ref" / "eval" / "results.jsonl").read_text().splitlines()[0])
    assert "ndcg@10" in report or "spearman" in report

    class Fixed(random.Random):  # the kills: mid-training (stage 1), mid-evaluation
        def sample(self, population, k):
            return [s for s in ("stage1", "eval") if s in population]

        def uniform(self, a, b):
            return 0.5

    res = chaos.trial(tmp_path / "t", ref, windows, 2, Fixed(0), smoke_inputs, log)
    assert res["final_status"] == 0 and res["different"] == [] and res["half_done"] == [], res
    assert len(res["kills"]) >= 2 and not any(k["half_done"] for k in res["kills"]), res
    # each kill interrupted the stage it was aimed at (a timer from the run's start missed evaluation once the
    # resumed stage 1 ran faster than the reference's)
    assert [k["interrupted"] for k in res["kills"]] == ["stage1", "eval"], res
