"""Out of device memory far into a run (``qwen3train/train/memory.py``): the rehearsal meets it after step 1,
the guard says it in one line naming the step and what fits, and that fix resumes the same run.

The device is simulated by ``tests/faults.py``'s ``memory_ceiling``: a forward that builds a graph over more
real tokens than the ceiling raises ``torch.OutOfMemoryError`` from inside the engine, as CUDA's allocator
does. The data: 48 short pairs (micro batches of 4 rows: 176-185 tokens in a forward) and one long record
that the seed's order draws at step 5 (a micro batch of 305 tokens in its sequences, 248 in its forward: the
queries' shared instruction is packed once)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import faults
from conftest import REPO
from helpers import make_pairs, rerank_cfg, train_cfg
from qwen3train.errors import ConfigError, OutOfMemory
from qwen3train.train.loop import run

CEILING = 220  # tokens: every short micro batch fits, the one with the long record (248) does not
LONG = {"query": "why " + " ".join(["glacier tensor ocean"] * 20), "pos": [" ".join(["kernel sonnet market"] * 30)],
        "neg": [" ".join(["violin galaxy"] * 40), " ".join(["protein compiler"] * 40)], "task": "alpha"}


def data_with_a_long_record(tmp_path, at: int = 30):
    path = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    lines = path.read_text().splitlines()
    lines[at] = json.dumps(LONG)
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg_for(model, data, out, **over):
    return train_cfg(model, data, out, max_steps=6, save_every=2, keep_last=10, grad_cache=True, **over)


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_out_of_memory_at_step_5_is_one_line_and_its_fix_resumes_with_the_same_loss(tiny_model_dir, tmp_path,
                                                                                    capsys):
    """Would catch: a traceback (torch's error) instead of the line; a line without the step, the micro batch,
    the intact checkpoint (step 4's, saved in the background as on CUDA: finished before the line names it) or a
    budget that fits; a resume refused because the micro batch changed (under
    GradCache it changes memory, not the loss); a resumed run whose losses differ from a run never stopped."""
    data = data_with_a_long_record(tmp_path)
    full = run(cfg_for(tiny_model_dir, data, tmp_path / "full"))  # a device large enough: the reference run
    undo = faults.memory_ceiling(CEILING)
    try:
        stopped = cfg_for(tiny_model_dir, data, tmp_path / "r")
        stopped.run.save_in_background = True  # as on CUDA: step 4's save is still being written at step 5
        with pytest.raises(OutOfMemory) as e:
            run(stopped)
        msg = str(e.value)
        budget = int(re.search(r"engine\.micro_batch_tokens=(\d+) ", msg).group(1))
        resumed = run(cfg_for(tiny_model_dir, data, tmp_path / "r", micro_batch_tokens=budget))  # ceiling on
    finally:
        undo()
    assert "\n" not in msg and "out of device memory at step 5 of 6" in msg, msg
    assert "4 rows, 305 tokens in 16 sequences, the longest 32" in msg, msg
    assert f"the last checkpoint {tmp_path / 'r' / 'checkpoints' / 'step_0000004'} is intact" in msg, msg
    assert "under GradCache the loss does not depend on the micro batches" in msg, msg
    assert budget == 305 // 2, budget  # half the micro batch (its long row, 4 x 32 = 128, alone is less)
    assert f"engine.micro_batch_tokens: None -> {budget}" in capsys.readouterr().out
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "r")
    assert [m["step"] for m in b] == list(range(1, 7))
    assert [m["loss"] for m in a[:4]] == [m["loss"] for m in b[:4]]
    assert [m["loss"] for m in a[4:]] == pytest.approx([m["loss"] for m in b[4:]], rel=1e-5)
    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("wrapped", [False, True])
def test_the_rehearsal_meets_it_after_step_1(tiny_model_dir, tmp_path, wrapped):
    """The micro batch that would stop the run at step 5 stops it after step 1. Would catch: a rehearsal that
    does not run, or runs on a micro batch lighter than the heaviest the data makes (the long record); wrapped
    (another error raised from CUDA's, as compiled code may report it): a traceback in place of the line."""
    data = data_with_a_long_record(tmp_path)
    cfg = cfg_for(tiny_model_dir, data, tmp_path / "r")
    cfg.engine.rehearse_memory = True
    undo = faults.memory_ceiling(CEILING, wrapped=wrapped)
    try:
        with pytest.raises(OutOfMemory) as e:
            run(cfg)
    finally:
        undo()
    msg = str(e.value)
    assert msg.startswith("out of device memory in the memory rehearsal after step 1"), msg
    tokens = int(re.search(r"4 rows, (\d+) tokens", msg).group(1))
    assert tokens >= 305, msg  # at least the micro batch that step 5 meets
    assert "engine.micro_batch_tokens=" in msg and "engine.rehearse_memory=false" in msg
    assert [m["step"] for m in metrics(tmp_path / "r")] == [1]


def test_a_wrapped_out_of_memory_in_a_step_is_the_same_line(tiny_model_dir, tmp_path):
    """Without the rehearsal, the step that meets the long record stops with the guard's line when the error is
    another one raised from CUDA's (compiled code may report it so). Would catch: a guard that knows only
    torch's own error (a traceback far into the run); a guard that turns any error into out of memory."""
    data = data_with_a_long_record(tmp_path)
    undo = faults.memory_ceiling(CEILING, wrapped=True)
    try:
        with pytest.raises(OutOfMemory, match=r"^out of device memory at step 5 of 6, .*micro_batch_tokens=\d+ "):
            run(cfg_for(tiny_model_dir, data, tmp_path / "r"))
    finally:
        undo()
    from qwen3train.train import loop

    real = loop.train_step

    def broken(*a, **k):
        raise RuntimeError("not a memory error")

    loop.train_step = broken
    try:
        with pytest.raises(RuntimeError, match="not a memory error"):
            run(cfg_for(tiny_model_dir, data, tmp_path / "other"))
    finally:
        loop.train_step = real


@pytest.mark.parametrize("budget", [None, 150])
def test_the_rehearsal_changes_nothing(tiny_model_dir, tmp_path, capsys, budget):
    """A run with the rehearsal equals one without, bitwise (weights, losses, learning rates), by rows and by
    a token budget. Would catch: the rehearsal's step reaching the weights or the optimizer's moments, moving
    the schedule, or drawing from the run's data. The printed line shows it ran on the long record."""
    data = data_with_a_long_record(tmp_path)
    cfgs = [cfg_for(tiny_model_dir, data, tmp_path / name, micro_batch_tokens=budget) for name in "ab"]
    for c in cfgs:
        c.run.max_steps = 3  # the rehearsal runs after step 1: steps 2 and 3 show what it left
    cfgs[1].engine.rehearse_memory = True
    plain, rehearsed = run(cfgs[0]), run(cfgs[1])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory rehearsal"))
    assert re.search(r"the heaviest micro batch of the data \(\d+ rows, \d+ tokens .* the longest 32\) fits", line), line
    assert int(re.search(r"(\d+) tokens", line).group(1)) >= 4 * 32  # the long row is in it: its 4 sequences at their longest
    wa, wb = load_file(plain / "model.safetensors"), load_file(rehearsed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [(m["loss"], m["lr"]) for m in a] == [(m["loss"], m["lr"]) for m in b]


def test_heaviest_records_by_their_size_on_disk(tmp_path):
    """The rehearsal's records: the largest lines of a JSONL file (the last line too, which no next line
    bounds), and of a Parquet file by a sample of rows. Would catch: sizes off by one line, the file's end
    forgotten, or records of another file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwen3train.data.sources import IndexedSource

    rows = [{"query": f"q{i}", "pos": ["p" * (10 + (i * 37) % 50)]} for i in range(20)]
    rows[19]["pos"] = ["z" * 500]  # the last line is the largest
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = [len(json.dumps(r)) + 1 for r in rows]
    src = IndexedSource([path], index_dir=tmp_path / "idx")
    got = src.heaviest(3)
    assert [i for _, i in got] == sorted(range(20), key=lambda i: (-sizes[i], i))[:3]
    assert [s for s, _ in got] == sorted(sizes, reverse=True)[:3]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    both = IndexedSource([path, tmp_path / "b.parquet"], index_dir=tmp_path / "idx")
    assert [i for _, i in both.heaviest(2)][:2] in ([19, 39], [39, 19])


def test_the_rehearsal_weighs_records_by_the_tokens_a_batch_holds(tiny_model_dir, tmp_path):
    """The largest line on disk can be light in a batch: a record made large by a long ``not_neg`` list (what
    ``make prepare`` writes for graded qrels) and by many short negatives of which a step takes K. The rehearsal
    takes the record heaviest in tokens (LONG, smaller on disk), with its longest K negatives. Would catch the
    pick by size on disk alone (the light record), or K negatives drawn at random instead of the longest."""
    from qwen3train.train.build import build_task

    path = data_with_a_long_record(tmp_path)
    lines = path.read_text().splitlines()
    bulky = {"query": "short one", "pos": ["a short positive"], "task": "alpha",
             "neg": ["tiny"] * 40 + [" ".join(["violin galaxy"] * 60), " ".join(["protein compiler"] * 60)],
             "not_neg": [f"a partly relevant document number {i} " * 8 for i in range(60)]}
    lines[10] = json.dumps(bulky)
    path.write_text("\n".join(lines) + "\n")
    assert len(lines[10]) > 5 * len(lines[30])  # the bulky record is by far the largest on disk
    cfg = cfg_for(tiny_model_dir, path, tmp_path / "r")
    task, loader = build_task(cfg, tmp_path / "r")
    one = loader.heaviest(1)
    assert [task.embedder.tok.tokenizer.decode(ids).split("Query:")[1][:20] for ids in one.q] == [LONG["query"][:20]]
    two = loader.heaviest(2)  # then the bulky one, with its 2 longest negatives (not 2 of the 40 "tiny")
    assert [len(ids) for ids in two.neg[1]] == [32, 32]
    rtask, rloader = build_task(rerank_cfg(tiny_model_dir, path, tmp_path / "rr"), tmp_path / "rr")
    group = rloader.heaviest(1)  # the reranker's rows are groups of prompts: the same record
    assert len(group) == 1 and "why glacier tensor" in rtask.reranker.tokenizer.decode(group.ids[0])


def test_a_resume_with_another_micro_batch(tiny_model_dir, tmp_path):
    """Allowed where the loss does not depend on it (GradCache; the reranker), refused where it does (the
    embedder without GradCache: each micro batch is its own contrastive batch) and when anything else changed
    too. Would catch: a memory fix refused, or a change of the loss let through."""
    from qwen3train.train import identity
    from qwen3train.train.loop import write_resolved_config

    data = make_pairs(tmp_path / "d.jsonl", n=8, k=3)
    for name, make, ok in [("gc", lambda o: cfg_for(tiny_model_dir, data, o), True),
                           ("plain", lambda o: train_cfg(tiny_model_dir, data, o), False),
                           ("rerank", lambda o: rerank_cfg(tiny_model_dir, data, o), True)]:
        out = tmp_path / name
        out.mkdir()
        old = make(out)
        write_resolved_config(old, out / "config.yaml")
        (out / "run_meta.json").write_text(json.dumps({"config_hash": identity.config_hash(old)}))
        new = make(out)
        new.engine.micro_batch_size, new.engine.micro_batch_tokens = 2, 100
        if ok:
            identity.check_resume(out, new, "auto")
        else:
            with pytest.raises(ConfigError, match="engine.micro_batch_size: 4 -> 2"):
                identity.check_resume(out, new, "auto")
        new.optim.lr = 0.5
        with pytest.raises(ConfigError, match="optim.lr"):
            identity.check_resume(out, new, "auto")


def test_through_the_command_line(tiny_model_dir, tmp_path):
    """One line, status 2, no traceback (the rehearsal's stop, through the real entry point)."""
    data = data_with_a_long_record(tmp_path)
    cmd = [sys.executable, str(REPO / "tests" / "faults.py"), "--config-name=stage1", f"model.name_or_path={tiny_model_dir}",
           f"data.train_files=[{data}]", "model.max_query_length=32", "model.max_doc_length=32",
           "data.num_hard_negatives=2", "engine.global_batch_size=8", "engine.micro_batch_size=4",
           "engine.grad_cache=true", "engine.rehearse_memory=true", "run.max_steps=3", f"run.output_dir={tmp_path}/r"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", QWEN3TRAIN_TEST_FAULT=f"memory_ceiling:{CEILING}",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("QWEN3TRAIN_DEBUG", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of device memory in the memory rehearsal after step 1"), last


def test_no_rehearsal_under_deepspeed_without_zero():
    """Refused when the config is read (DeepSpeed without ZeRO applies a non-finite step), not silently skipped;
    ZeRO 1-3 rehearse (tests/distributed/test_deepspeed.py: ZeRO-2, and ZeRO-3 with CPU Adam)."""
    from qwen3train.train.engine import EngineConfig

    with pytest.raises(ValueError, match="engine.rehearse_memory=true needs the torch engine or ZeRO stage 1-3"):
        EngineConfig(backend="deepspeed", zero_stage=0, rehearse_memory=True)
    EngineConfig(backend="deepspeed", zero_stage=2, rehearse_memory=True)
