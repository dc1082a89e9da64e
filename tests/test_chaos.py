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
    """What configs/smoke.yaml reads, made here: the docstring pairs and corpus, a dev split cut from the
    training pairs (never the held-out pairs it evaluates on), the tiny model as backbone and generator."""
    from qwen3train.data.demo import build

    root = tmp_path_factory.mktemp("smoke-data")
    build(root)
    rows = (root / "train_pairs.jsonl").read_text().splitlines()
    (root / "dev.jsonl").write_text("\n".join(rows[:40]) + "\n")
    return [f"model.name_or_path={tiny_model_dir}", f"synth.generator={tiny_model_dir}",
            f"synth.corpus=[{root / 'corpus.jsonl'}]", f"extra_stage1_data=[{root / 'train_pairs.jsonl'}]",
            f"extra_stage2_data=[{root / 'train_pairs.jsonl'}]", f"merge.dev_file={root / 'dev.jsonl'}",
            f"eval.pairs=[{root / 'heldout.jsonl'}]", "eval.collections=[]", "synth.max_passages=2",
            "synth.sampling.max_new_tokens=16", "mine.sample=300"]


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
