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
        {"fallback": True, "metric": "ndcg@10", "best_merge_score": 0.31, "score": 0.33, "chosen": "input step_20"}))
    text = "\n".join(summary(rows, tmp_path))
    assert "target base < stage 1 < stage 2: **met**" in text  # 0.15 < 0.25 < 0.35 (last checkpoint, @20)
    assert "target merged >= stage 2 (last checkpoint): **NOT met**" in text  # 0.335 < 0.35
    assert "raises nDCG@10 over its first stage on average (+0.0200): **met**" in text
    assert "stays below BM25 on average (0.3350 vs 0.3500); below it on 1 of 2 sets (b)" in text
    assert "merging did not pay" in text and "input step_20" in text
