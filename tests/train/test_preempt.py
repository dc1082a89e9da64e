"""A run its cluster stops (SIGTERM: a SLURM time limit or preemption, a kill) finishes its step, saves a
checkpoint, says so in one line and exits 143; the same command resumes it and ends where an uninterrupted
run ends. Through the real entry points: the CLI on one process, and the torchrun wrapper on two (the signal
sent to the wrapper, as SLURM or a user would, and passed on to the ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from helpers import make_pairs

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
STEPS = 24


def _command(out, model, data, nproc):
    launcher = (["-m", "qwen3train.cli.ranks", "--standalone", "--nproc_per_node", str(nproc), "--master_port", "auto"]
                if nproc > 1 else [])
    return [sys.executable, *launcher, "-m", "qwen3train.cli.main", "--config-name=stage2",
            f"model.name_or_path={model}", "model.init_from=null", f"data.train_files=[{data}]",
            "data.num_hard_negatives=2", "engine.grad_cache=true", "engine.micro_batch_size=4",
            "engine.global_batch_size=8", f"run.max_steps={STEPS}", "run.save_every=0", f"run.output_dir={out}"]


def _run(out, model, data, nproc=1, stop_after=None):
    """The run; with ``stop_after``, SIGTERM once that many steps are logged: to the process itself on one
    process, to every process of the run on two (as SLURM signals a job step: the wrapper, torchrun and the
    ranks each get it, the ranks maybe again from torchrun). -> (status, stderr)."""
    proc = subprocess.Popen(_command(out, model, data, nproc), env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if stop_after is not None:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= stop_after):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        if nproc == 1:
            proc.send_signal(signal.SIGTERM)
        else:  # torchrun starts its ranks in sessions of their own: each process by its pid
            import psutil  # accelerate's dependency

            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _stopped_at(err: str) -> int:
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert len(lines) == 1, err[-3000:]  # said once, by rank 0
    assert "Traceback" not in err, err[-3000:]
    return int(lines[0].split("after step ")[1].split(" ")[0])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_where_an_uninterrupted_run_ends(tiny_model_dir, tmp_path):
    """One process: status 143, one line, a checkpoint at the step it stopped after although run.save_every=0;
    the rerun resumes there and its losses and final weights are bitwise an uninterrupted run's (catches a save
    that misses the data position or the optimizer state, and a signal that kills without saving). Two processes
    through the wrapper, every process signalled as SLURM does: the ranks stop after the same step with one
    resumable checkpoint, said once, no torchrun traceback, status 143 (catches a rank left behind in a
    collective: a hang or a crash, and torchrun's report of the signal shown as a failure)."""
    data = make_pairs(tmp_path / "d.jsonl", n=64, k=2)
    rc, err = _run(tmp_path / "whole", tiny_model_dir, data)
    assert rc == 0, err[-3000:]
    for nproc in (1, 2):
        out = tmp_path / f"stopped{nproc}"
        rc, err = _run(out, tiny_model_dir, data, nproc, stop_after=3)
        assert rc == 128 + signal.SIGTERM, err[-3000:]
        step = _stopped_at(err)
        assert 3 <= step < STEPS
        assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:07d}"]
        state = json.loads((out / "checkpoints" / f"step_{step:07d}" / "train_state.json").read_text())
        assert state["step"] == step and state["resumable"] and state["world_size"] == nproc
        assert not (out / "final").exists()
    out = tmp_path / "stopped1"
    rc, err = _run(out, tiny_model_dir, data)
    assert rc == 0, err[-3000:]
    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(out)) == STEPS and losses(out) == losses(tmp_path / "whole")
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(v, got[k]) for k, v in whole.items())


PIPELINE_STAGE = """
import sys
from dataclasses import replace
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from qwen3train.config import register_configs
from qwen3train.errors import StoppedBySignal
from qwen3train.pipeline import Pipeline

register_configs()
repo, out, model, data = sys.argv[1:]
with initialize_config_dir(config_dir=repo + "/configs", version_base="1.3"):
    cfg = OmegaConf.to_object(compose(config_name="pipeline", overrides=[f"output_dir={out}"]))
pipe = Pipeline(cfg)
train = pipe.train_cfg(cfg.stage2, "stage2", [data], None, base=model)
train.run = replace(train.run, max_steps=%d, save_every=0, eval_every=0, eval_file=None)
train.data = replace(train.data, num_hard_negatives=2)
train.engine = replace(train.engine, grad_cache=True, micro_batch_size=4, global_batch_size=8)
try:
    pipe.launch("stage2", train)
except StoppedBySignal as e:
    print(f"pipeline: {type(e).__name__}: {e}", flush=True)
""" % STEPS


@pytest.mark.slow
def test_the_pipeline_passes_sigterm_to_its_stage_and_says_it_stopped(tiny_model_dir, tmp_path):
    """SIGTERM to the pipeline's process while a training stage runs reaches the stage (a user's ``kill``: SLURM
    signals every process): the stage saves a checkpoint and stops, and the pipeline says it stopped, not that the
    stage failed (catches a stage left running when the pipeline goes, and a stop reported as a crash)."""
    data = make_pairs(tmp_path / "d.jsonl", n=64, k=2)
    out = tmp_path / "pipe"
    proc = subprocess.Popen([sys.executable, "-c", PIPELINE_STAGE, str(REPO), str(out), str(tiny_model_dir), str(data)],
                            env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "stage2" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    step = _stopped_at(err)
    assert "pipeline: StoppedBySignal: stopped by SIGTERM during stage stage2; what it finished is kept" in stdout
    assert [p.name for p in (out / "stage2" / "checkpoints").iterdir()] == [f"step_{step:07d}"]
