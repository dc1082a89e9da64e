"""Evaluation during training (run.eval_every): the dev score logged at a step is the score an
independent evaluation of that step's export gives; the best step is recorded and its checkpoint
survives the pruning; merge can pick checkpoints by it."""

from __future__ import annotations

import json

import pytest

from helpers import make_pairs, rerank_cfg, train_cfg
from qwen3train.train.loop import run


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_embedder_dev_score_equals_evaluating_the_export(tiny_model_dir, tmp_path):
    data = make_pairs(tmp_path / "train.jsonl", n=48, k=1)
    dev = make_pairs(tmp_path / "dev.jsonl", n=16, k=0)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=6, save_every=2, keep_last=0)
    cfg.run.eval_every, cfg.run.eval_file = 2, str(dev)
    final = run(cfg)
    m = rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in m if "dev_ndcg@10" in r] == [2, 4, 6]  # every 2 steps, the end included
    evals = rows(tmp_path / "run" / "dev_eval.jsonl")
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["score"] == max(e["ndcg@10"] for e in evals) and best["checkpoint"].endswith(f"step_{best['step']:07d}")
    from qwen3train.eval.pairs import evaluate_pairs

    ref = evaluate_pairs(final, dev)  # the export, loaded and scored by `make eval`'s code
    assert abs(ref["ndcg@10"] - evals[-1]["ndcg@10"]) < 1e-4 and abs(ref["mrr@10"] - evals[-1]["mrr@10"]) < 1e-4

    from qwen3train.merge.apply import MergeConfig, SelectConfig
    from qwen3train.merge.run import resolve_inputs

    ranked = sorted(evals, key=lambda e: (-e["ndcg@10"], -e["step"]))
    picked = resolve_inputs(MergeConfig(run_dir=str(tmp_path / "run"), select=SelectConfig(best=2)))
    assert [int(p.parent.name.split("_")[1]) for p in picked] == sorted(e["step"] for e in ranked[:2])


def test_best_checkpoint_survives_pruning(tmp_path):
    from qwen3train.train import checkpoint

    for step in (2, 4, 6, 8):
        (checkpoint.step_dir(tmp_path, step) / "model").mkdir(parents=True)
        (checkpoint.step_dir(tmp_path, step) / "train_state.json").write_text("{}")
    checkpoint.prune(tmp_path, keep_last=1, keep_every=0, keep_steps=(4,))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000008"]


def test_reranker_dev_score_equals_scoring_the_export(tiny_model_dir, tmp_path):
    data = make_pairs(tmp_path / "train.jsonl", n=24, k=3)
    dev = make_pairs(tmp_path / "dev.jsonl", n=6, k=3)
    cfg = rerank_cfg(tiny_model_dir, data, tmp_path / "rr", max_steps=2)
    cfg.run.eval_every, cfg.run.eval_file = 2, str(dev)
    final = run(cfg)
    got = rows(tmp_path / "rr" / "dev_eval.jsonl")[-1]
    from qwen3train.eval.metrics import evaluate_run
    from qwen3train.models.build import ModelConfig, build_reranker
    from qwen3train.models.reranker import DEFAULT_RERANK_INSTRUCTION

    rr = build_reranker(ModelConfig(name_or_path=str(final), padding_side="left"), max_length=160)
    run_, qrels = {}, {}
    for i, r in enumerate(rows(dev)):
        cands = r["pos"] + r["neg"]
        probs = rr.score(r["query"], cands, instruction=DEFAULT_RERANK_INSTRUCTION)
        run_[str(i)] = [(str(j), float(p)) for j, p in enumerate(probs.tolist())]
        qrels[str(i)] = {"0": 1}
    ref = evaluate_run(run_, qrels)
    assert abs(ref["ndcg@10"] - got["ndcg@10"]) < 1e-4


def test_eval_every_needs_a_dev_file():
    from qwen3train.train.config import RunConfig

    with pytest.raises(ValueError, match="run.eval_file"):
        RunConfig(eval_every=10)


def test_collection_dev_set_equals_evaluating_the_export(tiny_model_dir, tmp_path):
    """run.eval_file may be a BEIR/TREC folder: the in-memory score equals `make eval` on the export."""
    from types import SimpleNamespace

    from conftest import FIXTURES
    from qwen3train.eval.retrieval import evaluate_collection
    from qwen3train.models.build import ModelConfig, build_embedder
    from qwen3train.models.export import export_embedder
    from qwen3train.text import DEFAULT_INSTRUCTION
    from qwen3train.train.dev_eval import DevEval

    emb = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), max_query_length=64, max_doc_length=128))
    task = SimpleNamespace(embedder=emb, module=emb, instruction=DEFAULT_INSTRUCTION)
    got = DevEval(str(FIXTURES / "vaswani"), task)()
    ref = evaluate_collection(export_embedder(emb, tmp_path / "exp", instruction=DEFAULT_INSTRUCTION),
                              FIXTURES / "vaswani", max_length=128)
    assert set(got) == {"ndcg@10", "recall@100", "mrr@10"}
    assert abs(got["ndcg@10"] - ref["ndcg@10"]) < 1e-4 and abs(got["recall@100"] - ref["recall@100"]) < 1e-4


def test_a_dev_evaluation_out_of_memory_loses_no_step(tiny_model_dir, tmp_path):
    """The loop saves a step's checkpoint before its dev evaluation: an evaluation that cannot fit (here every
    text is over the simulated device: tests/faults.py) stops the run with one line naming the step and the
    intact checkpoint of that very step; the rerun resumes there, evaluates the missed step first, and ends
    with the dev scores of a run that never stopped. Fails if the evaluation came before the save (the
    checkpoint of step 4 would be missing), if the missed step were not evaluated, or were evaluated with
    other weights than the checkpoint's."""
    import faults
    from qwen3train.errors import OutOfMemory

    data = make_pairs(tmp_path / "train.jsonl", n=48, k=1)
    dev = make_pairs(tmp_path / "dev.jsonl", n=16, k=0)

    def cfg(out):
        c = train_cfg(tiny_model_dir, data, tmp_path / out, max_steps=6, save_every=2, keep_last=0)
        c.run.eval_every, c.run.eval_file = 2, str(dev)
        return c

    run(cfg("ref"))
    undo = None

    def hooks(step):
        nonlocal undo
        if step == 3:  # from step 4's evaluation on, no text fits
            undo = faults.inference_ceiling(1)

    try:
        with pytest.raises(OutOfMemory, match=r"dev evaluation at step 4: out of device memory encoding a single "
                                              r"text .*the last checkpoint \S+step_0000004 is intact"):
            stopped = cfg("run")
            stopped.run.save_in_background = True  # as on CUDA: step 4's save is being written during its evaluation
            run(stopped, hooks=hooks)
    finally:
        undo()
    assert [r["step"] for r in rows(tmp_path / "run" / "dev_eval.jsonl")] == [2]
    run(cfg("run"))
    got, ref = rows(tmp_path / "run" / "dev_eval.jsonl"), rows(tmp_path / "ref" / "dev_eval.jsonl")
    assert [r["step"] for r in got] == [2, 4, 6] and got[1]["checkpoint"].endswith("step_0000004")
    assert all(abs(a["ndcg@10"] - b["ndcg@10"]) < 1e-6 and abs(a["mrr@10"] - b["mrr@10"]) < 1e-6
               for a, b in zip(got, ref))


def test_sigterm_saves_without_waiting_for_the_dev_evaluation(tiny_model_dir, tmp_path):
    """A cluster's SIGTERM gives minutes: the step's checkpoint is saved and the run stops without the dev
    evaluation that step was due (a large dev set could outlast the grace period); the rerun evaluates it
    first. Fails if the stopping step is evaluated before stopping, or never."""
    import os
    import signal

    from qwen3train.errors import StoppedBySignal

    data = make_pairs(tmp_path / "train.jsonl", n=48, k=1)
    dev = make_pairs(tmp_path / "dev.jsonl", n=16, k=0)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=4, save_every=0, keep_last=0)
    cfg.run.eval_every, cfg.run.eval_file = 2, str(dev)

    def term(step):
        if step == 1:  # received during step 2, which then finishes, saves and stops
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StoppedBySignal, match="after step 2 of 4"):
        run(cfg, hooks=term)
    assert not (tmp_path / "run" / "dev_eval.jsonl").exists()
    run(cfg)
    got = rows(tmp_path / "run" / "dev_eval.jsonl")
    assert [r["step"] for r in got] == [2, 4] and got[0]["checkpoint"].endswith("step_0000002")


def test_a_collection_scores_the_run_on_its_dev_split_where_it_has_one(tmp_path, capsys):
    """The dev scores pick best.json's step: a BEIR folder was read at its test split even when it had a dev
    split (choosing the checkpoint on the evaluation set). Now qrels/dev.tsv where present; else the test
    split, with a note saying its figures are not held out."""
    import json
    from types import SimpleNamespace

    from qwen3train.train.dev_eval import DevEval

    b = tmp_path / "beir"
    (b / "qrels").mkdir(parents=True)
    (b / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(4)))
    (b / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(4)))
    (b / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    task = SimpleNamespace(embedder=None, module=None)
    assert set(DevEval(str(b), task).collection.qrels) == {"q0"}
    assert "has no dev split (qrels/dev.tsv)" in capsys.readouterr().out
    (b / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    assert set(DevEval(str(b), task).collection.qrels) == {"q1", "q2"}
    assert "no dev split" not in capsys.readouterr().out
    m = tmp_path / "msmarco"  # MS MARCO's own layout: qrels.dev.tsv (with dev.small beside it)
    m.mkdir()
    (m / "collection.tsv").write_text("".join(f"d{i}\tdoc {i}\n" for i in range(4)))
    for split, judged in (("train", "q0"), ("dev", "q3"), ("dev.small", "q2")):
        (m / f"queries.{split}.tsv").write_text("".join(f"q{i}\tquery {i}\n" for i in range(4)))
        (m / f"qrels.{split}.tsv").write_text(f"{judged}\t0\td1\t1\n")
    assert set(DevEval(str(m), task).collection.qrels) == {"q3"}
