"""The report's summary: averages per stage, the recipe's targets, BM25 and the merge decision."""

from __future__ import annotations

import json

from qwen3train.report import summary


def _rows(scores: dict[str, dict[str, float]]) -> list[dict]:
    return [{"model": m, "dataset": d, "dim": None, "ndcg@10": v} for m, per in scores.items() for d, v in per.items()]


def test_targets_and_bm25_verdict_follow_the_numbers(tmp_path):
    """A merged model worse than stage 2 and below BM25 on one set must be reported as such: catches a
    summary that always says 'met' or compares the wrong rows (e.g. the first stage-2 checkpoint)."""
    rows = _rows({"base": {"a": 0.10, "b": 0.20}, "stage1": {"a": 0.20, "b": 0.30},
                  "stage2@10": {"a": 0.50, "b": 0.50}, "stage2@20": {"a": 0.30, "b": 0.40},
                  "merged": {"a": 0.28, "b": 0.39}, "BM25 (bm25s)": {"a": 0.25, "b": 0.45}})
    rows.append({"model": "reranker(merged) (rerank top-20)", "dataset": "a", "dim": None, "ndcg@10": 0.3,
                 "ndcg@10_before": 0.28})
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "merge_selection.json").write_text(json.dumps(
        {"fallback": True, "metric": "ndcg@10", "best_merge_score": 0.31, "score": 0.33, "chosen": "input step_20",
         "p_merge_better": 0.62, "queries": 350, "confidence": 0.9}))
    text = "\n".join(summary(rows, tmp_path))
    assert "target base < stage 1 < stage 2: **met**" in text  # 0.15 < 0.25 < 0.35 (last checkpoint, @20)
    assert "target merged >= stage 2 (last checkpoint): **NOT met**" in text  # 0.335 < 0.35
    assert "raises nDCG@10 over its first stage on average (+0.0200): **met**" in text
    assert "stays below BM25 on average (0.3350 vs 0.3500); below it on 1 of 2 sets (b)" in text
    assert "merging did not pay" in text and "input step_20" in text
    assert "(best merge ndcg@10 0.3100 vs 0.3300, P(merge better) 0.62 over 350 dev queries, 0.9 needed)" in text


def test_report_shows_dev_scores_during_training_and_mteb(tmp_path):
    """A stage trained with run.eval_every and an MTEB run of the pipeline's output appear in the report:
    the dev table marks the best step (the latest value of a re-evaluated step counts)."""
    from qwen3train.report import write_report

    st = tmp_path / "stage2"
    st.mkdir()
    evals = [{"step": 8, "ndcg@10": 0.31}, {"step": 16, "ndcg@10": 0.30}, {"step": 16, "ndcg@10": 0.36},
             {"step": 24, "ndcg@10": 0.33}]
    (st / "dev_eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (st / "best.json").write_text(json.dumps({"step": 16, "metric": "ndcg@10", "score": 0.36}))
    (tmp_path / "mteb").mkdir()
    (tmp_path / "mteb" / "results.jsonl").write_text(json.dumps(
        {"model": "merged", "task": "arcd", "split": "test", "subset": "default", "main_score": 0.25,
         "ndcg@10": 0.25, "recall@100": 0.7}) + "\n")
    text = write_report(tmp_path).read_text()
    assert "stage2: ndcg@10 by step (best 0.3600 at step 16)" in text
    assert "| 16 (best) | 0.3600 |" in text and "| 24 | 0.3300 |" in text and "0.3000" not in text
    assert "## MTEB" in text and "| merged | arcd | test | default | 0.2500 | 0.2500 | 0.7000 |" in text
    assert "skipped" not in text


def test_report_names_skipped_steps(tmp_path):
    """Steps a stage skipped with non-finite gradients (train.loop.skip_step's file) are counted and named in
    the report's training section, per stage; a stage without them gets no line."""
    from qwen3train.report import write_report

    for stage, steps in (("stage1", [812, 813]), ("stage2", [])):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "skipped_steps.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": "nan", "grad_norm": "nan", "update_applied": False, "records": []}) + "\n"
            for s in steps))
    text = write_report(tmp_path).read_text()
    assert "## Training" in text
    assert "- stage1: **2 step(s) skipped** with non-finite loss or gradients (steps 812, 813;" in text
    assert "stage2:" not in text


def test_a_fused_reranker_is_reported_with_its_weight_and_its_score_alone(tmp_path):
    """With fusion the reranker target is judged on the fused ranking (what the run ships), and the line
    says the weight, where it was chosen and what the reranker alone did (here it lost: -0.0200), so a fused
    gain cannot pass for the reranker's own."""
    rows = _rows({"base": {"a": 0.1}, "stage1": {"a": 0.2}, "stage2@20": {"a": 0.3}, "merged": {"a": 0.3}})
    rows.append({"model": "reranker (rerank top-10)", "dataset": "a", "dim": None, "ndcg@10": 0.31,
                 "ndcg@10_before": 0.30, "fusion": 0.6, "ndcg@10_alone": 0.28})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "fusion_reranker.json").write_text(json.dumps({"weight": 0.6, "dev_file": "dev.jsonl"}))
    text = "\n".join(summary(rows, tmp_path))
    assert ("raises nDCG@10 over its first stage on average (+0.0100; its score fused with the first stage's at "
            "weight 0.6 chosen on dev.jsonl; the reranker alone -0.0200): **met**") in text

