"""Checkpoints written in the background (``run.save_in_background``, the default on CUDA): the files are those a
save in the foreground writes at that step, although training goes on while they are written; a kill while they
are being written leaves the previous checkpoint as the last one, and the rerun resumes from it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple

import pytest
import torch

from conftest import REPO
from helpers import make_pairs, rerank_cfg, train_cfg
from qwen3train.integrity import recorded, verify
from qwen3train.train.checkpoint import list_checkpoints
from qwen3train.train.loop import run

WRITER = "qwen3train-checkpoint-writer"
Pair = namedtuple("Pair", "a b")  # at module level: pickle finds it


def _run(cfg, background: bool, monkeypatch):
    """The run, with every ``torch.save`` on the writer's thread held 0.3 s (a slow disk) so that the next steps
    run while a checkpoint is written. -> (thread names torch.save ran on, steps that ran while a writer was busy)."""
    real, threads, overlapped = torch.save, set(), []

    def held(obj, f, *a, **kw):
        threads.add(threading.current_thread().name)
        if threading.current_thread().name == WRITER:
            time.sleep(0.3)
        return real(obj, f, *a, **kw)

    def hook(step: int) -> None:
        if any(t.name == WRITER for t in threading.enumerate()):
            overlapped.append(step)

    cfg.run.save_in_background = background
    monkeypatch.setattr(torch, "save", held)
    try:
        run(cfg, hooks=hook)
    finally:
        monkeypatch.setattr(torch, "save", real)
    return threads, overlapped


@pytest.mark.parametrize("kind", ["embedder", "reranker"])
def test_a_background_save_writes_what_the_foreground_writes(tiny_model_dir, tmp_path, monkeypatch, kind):
    """Every checkpoint of a run saving every 2 steps in the background has the files, byte for byte (their
    checksums), of the same run saving in the foreground, although steps ran while its files were being written.
    Catches a writer that reads the live weights or optimizer moments (the files would hold a later step's), an
    export that reads the module while it trains, and a save that was in the foreground after all."""
    data = make_pairs(tmp_path / "d.jsonl", n=48, k=3 if kind == "reranker" else 2)
    made = {}
    for background in (False, True):
        out = tmp_path / f"bg{int(background)}"
        cfg = (rerank_cfg(tiny_model_dir, data, out, max_steps=6, save_every=2, keep_last=10) if kind == "reranker"
               else train_cfg(tiny_model_dir, data, out, max_steps=6, save_every=2, keep_last=10))
        made[background] = _run(cfg, background, monkeypatch)
        assert [c.name for c in list_checkpoints(out)] == ["step_0000002", "step_0000004", "step_0000006"]
        assert not list((out / "checkpoints").glob(".*.tmp"))
    (fg_threads, fg_overlap), (bg_threads, bg_overlap) = made[False], made[True]
    assert WRITER not in fg_threads and not fg_overlap
    assert WRITER in bg_threads and bg_overlap, (bg_threads, bg_overlap)  # steps ran while a writer wrote
    for fg, bg in zip(list_checkpoints(tmp_path / "bg0"), list_checkpoints(tmp_path / "bg1")):
        assert verify(bg) == [] and verify(bg / "model") == []
        a, b = recorded(fg), recorded(bg)
        assert sorted(a) == sorted(b)
        differ = [rel for rel in a if a[rel] != b[rel]]
        assert not differ, (bg.name, differ)


def test_a_snapshot_is_a_copy_that_pickles_as_the_original(tmp_path):
    """``snapshot``: later in-place changes do not reach it; two tensors over the same bytes (a tied weight) stay two
    tensors over one copy, an object met twice stays one, the kinds of mapping and tuple are kept, and ``torch.save``
    writes it byte for byte as it writes the original (a view of part of a tensor is copied compact). Catches a copy that aliases the live tensor, one that writes
    a tied weight twice, and one that loses a defaultdict's factory or a namedtuple's fields."""
    from collections import OrderedDict, defaultdict

    from qwen3train.train.background import snapshot

    w = torch.arange(12.0).reshape(3, 4)
    betas = (0.9, 0.999)
    state = OrderedDict(embed=w, head=w.detach(), same=w, view=w[1:], groups=[{"betas": betas}, {"betas": betas}],
                        moments=defaultdict(list, m=[torch.ones(2)]), pair=Pair(torch.zeros(1), 3))
    state._metadata = {"": {"version": 1}}
    copy = snapshot(state)
    w.add_(100)
    assert copy["embed"][0, 0].item() == 0 and copy["view"][0, 0].item() == 4
    assert copy["same"] is copy["embed"] and copy["head"] is not copy["embed"]
    assert copy["head"].untyped_storage().data_ptr() == copy["embed"].untyped_storage().data_ptr()
    assert copy["groups"][0]["betas"] is copy["groups"][1]["betas"]
    assert type(copy) is OrderedDict and copy._metadata == state._metadata
    assert copy["moments"].default_factory is list and type(copy["pair"]) is Pair and copy["pair"].b == 3
    assert copy["view"].untyped_storage().nbytes() == 8 * 4  # a view is copied compact, as DeepSpeed clones one
    w.sub_(100)
    del state["view"], copy["view"]  # (so torch.save writes the original's whole storage, the copy its own part)
    for name, obj in (("a", state), ("b", copy)):  # the same file name: the archive's records are named after it
        (tmp_path / name).mkdir()
        torch.save(obj, tmp_path / name / "s.pt")
    assert (tmp_path / "a" / "s.pt").read_bytes() == (tmp_path / "b" / "s.pt").read_bytes()


def test_a_wait_for_the_writer_is_named(tmp_path, monkeypatch, capsys):
    """The next save came while the writer was still writing: the note says how long training waited for it (on a
    GPU node, saves closer than their write stall the steps, and only this line shows it); a writer done before the
    finish gives none. Catches a wait that goes unsaid, and a note for every save."""
    from qwen3train.train.background import Writer
    from qwen3train.train.checkpoint import Pending

    monkeypatch.setattr(Pending, "NAMED_WAIT", 0.2)
    for hold, named in ((0.6, True), (0.0, False)):
        root = tmp_path / f"run{hold}"
        tmp = root / "checkpoints" / ".step_0000004.tmp"
        tmp.mkdir(parents=True)
        writer = Writer(tmp, background=True)
        writer.call(lambda: (time.sleep(hold), (tmp / "train_state.json").write_text("{}")), tmp / "train_state.json")
        writer.start()
        if not named:
            writer.wait()
        Pending(root, root / "checkpoints" / "step_0000004", tmp, writer, 4, False).finish(10, 0)
        out = capsys.readouterr().out
        assert ("for the background write of step_0000004" in out) == named, out
        assert (root / "checkpoints" / "step_0000004" / "train_state.json").exists()


def _command(out, model, data):
    return [sys.executable, str(REPO / "tests" / "faults.py"), "--config-name=stage1", f"model.name_or_path={model}",
            f"data.train_files=[{data}]", "engine.micro_batch_size=4", "engine.global_batch_size=8", "run.max_steps=8",
            "run.save_every=2", "run.keep_last=10", "run.save_in_background=true", f"run.output_dir={out}"]


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_in_the_background_resumes_from_the_one_before(tiny_model_dir, tmp_path):
    """The engine state of step 4's save is held on its writer (a stuck disk); training goes on to step 5, and the
    process is killed (SIGKILL: nothing of ours runs). Step 2's checkpoint is the last one, step 4's is only its
    hidden .tmp folder; the rerun resumes from step 2 and ends with every checkpoint whole, having removed the
    partial saves first, one of a step it never saves at too (named, with their size). Catches a checkpoint moved
    into place (or named by the manifest) before its files were written, and a partial save kept for good."""
    data = make_pairs(tmp_path / "d.jsonl", n=96, k=0)
    out = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               QWEN3TRAIN_TEST_FAULT="slow:0:torch.save:600:3")  # torch.save's third call: step 4's engine state
    proc = subprocess.Popen(_command(out, tiny_model_dir, data), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpts = out / "checkpoints"
    assert [c.name for c in list_checkpoints(out)] == ["step_0000002"] and verify(ckpts / "step_0000002") == []
    assert (ckpts / ".step_0000004.tmp").is_dir()
    # and one of a step this run never saves at (an earlier run's, with another run.save_every), cut short too:
    # nothing would ever replace it
    shutil.copytree(ckpts / ".step_0000004.tmp", ckpts / ".step_0000003.tmp")
    env.pop("QWEN3TRAIN_TEST_FAULT")
    done = subprocess.run(_command(out, tiny_model_dir, data), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_0000002'} (step 2)" in done.stdout + done.stderr
    assert "removed 2 partial save(s) that a kill or an error left (.step_0000003.tmp, .step_0000004.tmp" in done.stdout
    assert [c.name for c in list_checkpoints(out)] == [f"step_000000{s}" for s in (2, 4, 6, 8)]
    assert all(verify(c) == [] for c in list_checkpoints(out)) and not list(ckpts.glob(".*.tmp"))
