"""Instructions come from one place: what a record trains with is what the export serves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import train_cfg  # noqa: E402

from qwen3train.data.instructions import REGISTRY, Instructions, resolve_instruction  # noqa: E402
from qwen3train.data.records import parse_record  # noqa: E402
from qwen3train.models.export import EXPORT_META  # noqa: E402
from qwen3train.text import DEFAULT_INSTRUCTION  # noqa: E402


def test_resolution_order():
    ins = Instructions({"sts": "mine"}, "the default")
    rec = parse_record({"query": "q", "pos": ["p"]}, "x")
    assert ins.of(rec) == "the default"  # no task: the model's default, not a registry string
    assert ins.of(parse_record({"query": "q", "pos": ["p"], "task": "sts"}, "x")) == "mine"
    assert ins.of(parse_record({"query": "q", "pos": ["p"], "task": "nq"}, "x")) == REGISTRY["nq"]
    assert ins.of(parse_record({"query": "q", "pos": ["p"], "task": "nq", "instruction": "own"}, "x")) == "own"
    # FlagEmbedding's field name for the same thing
    assert ins.of(parse_record({"query": "q", "pos": ["p"], "prompt": "flag"}, "x")) == "flag"
    assert ins.document("sts", None) == "mine" and ins.document("nq", None) is None
    assert resolve_instruction("default", None, {}) == DEFAULT_INSTRUCTION


@pytest.mark.slow
def test_taskless_record_trains_with_the_exported_query_prompt(tiny_model_dir, tmp_path):
    """Train on records without a task, export, load in sentence-transformers: the query tokens the
    model trained on equal what `encode(prompt_name="query")` feeds it. Before: the registry's
    "default" string trained, the model's default instruction was exported."""
    from sentence_transformers import SentenceTransformer

    from qwen3train.train.build import build_task
    from qwen3train.train.loop import run

    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            row = {"query": f"question {i} about tides", "pos": [f"passage {i} on the moon and tides"]}
            if i % 2:
                row["task"] = "nq"
            f.write(json.dumps(row) + "\n")
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", k=0, max_steps=1, micro=4, global_batch=4)
    cfg.model.default_instruction = "Find the passage that answers this question"
    final = run(cfg)
    _, loader = build_task(cfg, tmp_path / "probe")
    st = SentenceTransformer(str(final), device="cpu")
    assert set(st.prompts) == {"query", "document", "nq"}  # one named prompt per task trained on
    for i in range(8):
        trained = loader.collate_items([(i, 0)]).q[0]
        rec = loader.source[i]
        name = "nq" if rec.task == "nq" else "query"
        served = st.tokenize([st.prompts[name] + rec.query])["input_ids"][0].tolist()
        assert trained == served, (name, i)
    meta = json.loads((final / EXPORT_META).read_text())
    assert meta["default_instruction"] == cfg.model.default_instruction and meta["task_instructions"] == {
        "nq": REGISTRY["nq"]}
