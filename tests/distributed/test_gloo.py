"""A 2-process gloo run gives the same loss and gradients as one process on the concatenated batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
from conftest import crash_report  # noqa: E402
from helpers import make_pairs, related_rows, rerank_cfg, train_cfg, with_teacher  # noqa: E402


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tiny_model_dir, tmp_path):
    # rows with pool documents that are no negatives of theirs, some on the other rank (loss.mask_not_neg), and a
    # teacher's scores on most rows (loss.kd_weight: each rank's share of the distillation term adds up), and
    # hardness-weighted negatives (loss.hardness_strength: the weights of the gathered pool, rows offset by rank)
    data = with_teacher(related_rows(make_pairs(tmp_path / "d.jsonl", k=2)))
    out = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS / "train"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "distributed" / "gloo_worker.py"), str(TESTS / "train"), str(tiny_model_dir), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, crash_report(proc)
    two = torch.load(out, weights_only=False)

    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run1", k=2, global_batch=8, micro=8, kd_weight=0.5, hardness=2.0)
    task, loader = build_task(cfg, tmp_path / "run1")
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    batch = loader.collate_items([(i, 0) for i in range(8)], 0)
    loss, _ = task.loss(task.forward(engine, batch), batch)
    loss.backward()
    ref = {n: p.grad for n, p in engine.module.named_parameters()}
    task.loss_fn.mask_not_neg = False
    with torch.no_grad():
        assert abs(task.loss(task.forward(engine, batch), batch)[0].item() - loss.item()) > 1e-4  # the mask acts
        task.loss_fn.mask_not_neg, task.loss_fn.kd_weight = True, 0.0
        assert abs(task.loss(task.forward(engine, batch), batch)[0].item() - loss.item()) > 1e-4  # and the teacher
        task.loss_fn.kd_weight, task.loss_fn.hardness = 0.5, 0.0
        assert abs(task.loss(task.forward(engine, batch), batch)[0].item() - loss.item()) > 1e-4  # and the weights
    for mode in ("plain", "gradcache"):
        loss2, grads2 = two[mode]
        assert abs(loss2 - loss.item()) <= 1e-5, mode
        for n, g in ref.items():
            assert (grads2[n] - g).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), (mode, n)

    # reranker: one process on the 4 queries == 2 processes with 2 each (DDP averages the gradients)
    rcfg = rerank_cfg(tiny_model_dir, data, tmp_path / "rr1", global_batch=4, micro=4, kd_weight=0.5)
    rtask, rloader = build_task(rcfg, tmp_path / "rr1")
    rengine = TorchEngine(rtask.module, rcfg.engine, rcfg.optim, 10)
    rbatch = rloader.collate_items([(i, 0) for i in range(4)], 0)
    rloss, _ = rtask.loss(rtask.forward(rengine, rbatch), rbatch)
    rloss.backward()
    loss2, grads2 = two["rerank"]
    assert abs(loss2 - rloss.item()) <= 1e-5
    for n, p in rengine.module.named_parameters():
        if p.grad is not None:
            assert (grads2[n] - p.grad).abs().max().item() <= 1e-5 * max(1.0, p.grad.abs().max().item()), n


@pytest.mark.slow
def test_a_streamed_source_resumes_on_another_process_count(tiny_model_dir, tmp_path):
    """A job with a streamed source (`datasets` streaming) requeued on fewer processes: steps 1-2 on 2
    gloo processes, 3-4 resumed on 1. Each rank's position is gathered into the checkpoint and the one
    process takes both parts on (data/hf.py; row by row exactness: tests/data/test_hf_sources.py). Would
    catch the refusal this replaced, a resume that reads the parts from their start again, or one that
    drops the part of the rank that is gone."""
    import json

    from conftest import REPO

    data = make_pairs(tmp_path / "d.jsonl", n=64, k=0)
    mix = f"data.mixture=[{{dataset: json, data_files: [{data}], streaming: true, shuffle_buffer: 4}}]"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def cli(steps, nproc, *extra):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", "qwen3train.cli.main", "--config-name=stage1", "engine=torch",
               "engine.precision=fp32", "engine.micro_batch_size=4", "engine.global_batch_size=8",
               f"run.max_steps={steps}", "run.save_every=2", f"run.output_dir={tmp_path / 'run'}",
               f"model.name_or_path={tiny_model_dir}", "model.max_doc_length=32", "data.train_files=[]", mix, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, crash_report(proc)

    def position(step):
        state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{step:07d}" / "train_state.json").read_text())
        return {v: (e, r) for c in state["cursors"][0] for v, e, r in c["state"]}

    cli(2, 2)
    assert position(2) == {0: (0, 8), 1: (0, 8)}  # 2 parts (one per process), 2 steps x 4 rows each
    cli(4, 1, "run.resume=force")  # a longer run is another config: resumed on purpose
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    after = position(4)
    assert set(after) == {0, 1} and sum(r for e, r in after.values() if e == 0) == 32, after


@pytest.mark.slow
def test_torch_engine_resumes_on_another_process_count(tiny_model_dir, tmp_path):
    """Steps 1-2 on 2 gloo processes, steps 3-4 resumed on 1 process == 4 steps on 1 process (GradCache,
    so the loss covers the same global batch either way). Catches state that only the writing
    process count can read (per-rank files, a data position in per-rank units)."""
    import json

    from conftest import REPO

    data = make_pairs(tmp_path / "d.jsonl", n=64, k=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def cli(out, steps, nproc, *extra):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", "qwen3train.cli.main", "--config-name=stage2", "engine=torch",
               "engine.precision=fp32", "engine.grad_cache=true", "engine.micro_batch_size=2",
               "engine.global_batch_size=8", f"run.max_steps={steps}", "run.save_every=2", f"run.output_dir={out}",
               f"model.name_or_path={tiny_model_dir}", "model.init_from=null", f"data.train_files=[{data}]",
               "data.num_hard_negatives=2", "optim.schedule=constant", "optim.warmup_ratio=0", "optim.lr=1e-3", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, crash_report(proc)
        with open(out / "stdout.log", "a") as f:
            f.write(proc.stdout)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    ref = cli(tmp_path / "a", 4, 1)
    cli(tmp_path / "b", 2, 2)
    got = cli(tmp_path / "b", 4, 1, "run.resume=force")  # a longer run is another config: resumed on purpose
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4

    # 2 processes resuming 2 processes, from the record index the first run built (no rank scans again); the
    # first of these rehearses its heaviest micro batch after step 1 (train/memory.py: a step DDP all-reduces
    # and the torch engine drops): the curve must not move
    cli(tmp_path / "c", 2, 2, "engine.rehearse_memory=true")
    # a newer checkpoint whose damage lies in the file that rank 1 reads when the two verify it together: the
    # resume must name it and take step 2 (a rank whose share went unread would resume from the damaged copy)
    from qwen3train.integrity import listing, shares

    good = tmp_path / "c" / "checkpoints" / "step_0000002"
    bad = good.with_name("step_0000003")
    shutil.copytree(good, bad)
    rel = shares(listing(bad), 2)[1][0]
    blob = bytearray((bad / rel).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / rel).write_bytes(bytes(blob))
    got = cli(tmp_path / "c", 4, 2, "run.resume=force", "engine.rehearse_memory=true")
    assert f"checkpoint {bad} is damaged ({rel}: checksum differs)" in (tmp_path / "c" / "stdout.log").read_text()
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
    assert (tmp_path / "c" / "stdout.log").read_text().count("memory rehearsal: the heaviest micro batch") == 2
    summary = json.loads((tmp_path / "c" / "data_summary.json").read_text())
    assert summary["index"]["built"] == [] and summary["records"] == 64
