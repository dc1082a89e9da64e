"""scripts/train_slurm.sh: SLURM's environment mapped to the launcher, tested with a faked SLURM
(a stand-in `srun` that starts one task per node, as `srun --ntasks-per-node=1` does)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import REPO
from qwen3train.cli.slurm import expand_hostlist, launcher_env

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun --ntasks-per-node=1: one copy of the command per node, SLURM_NODEID / SLURM_PROCID set
while [[ "$1" == -* ]]; do shift; done
n=${SLURM_JOB_NUM_NODES:-1}; pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_STEP_ID=0 "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.parametrize("spec,hosts", [
    ("gpu[01-03,07],login", ["gpu01", "gpu02", "gpu03", "gpu07", "login"]),
    ("node17", ["node17"]),
    ("x[008-010]", ["x008", "x009", "x010"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


def test_launcher_env_mapping():
    base = {"SLURM_JOB_NODELIST": "gpu[101-104]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2",
            "SLURM_JOB_ID": "123456"}
    env = launcher_env(dict(base, SLURM_GPUS_ON_NODE="8"))
    assert env == {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "gpu101", "MASTER_PORT": str(20000 + 123456 % 20000),
                   "NGPU": "8"}
    assert launcher_env(dict(base, SLURM_GPUS_PER_NODE="h100:4"))["NGPU"] == "4"
    assert launcher_env(dict(base, CUDA_VISIBLE_DEVICES="0,1,2"))["NGPU"] == "3"
    assert launcher_env(dict(base, NGPU="2", MASTER_PORT="29999", SLURM_GPUS_ON_NODE="8")) | {} == dict(
        env, NGPU="2", MASTER_PORT="29999")
    # the Makefile's MASTER_PORT=auto (a free port on one node) must not reach the nodes: they agree on the job's
    assert launcher_env(dict(base, MASTER_PORT="auto", SLURM_GPUS_ON_NODE="8")) == env
    with pytest.raises(ValueError, match="outside the job's 4 nodes"):
        launcher_env(dict(base, SLURM_NODEID="4"))
    with pytest.raises(ValueError, match="not inside a SLURM allocation"):
        launcher_env({})


def _sbatch(tmp_path, stage, overrides, *, nodes, gpus_per_node, nodelist):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    job = random.randint(1, 10**6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "QWEN3TRAIN_IN_SRUN", "NGPU", "MASTER_"))}
    env.update(PATH=f"{bindir}:{env['PATH']}", SLURM_JOB_ID=str(job), SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_JOB_NODELIST=nodelist, SLURM_GPUS_ON_NODE=str(gpus_per_node), SLURM_SUBMIT_DIR=str(REPO),
               PY=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_slurm.sh"), stage, *overrides], env=env,
                          capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("stage,nodes,gpus", [("stage1", 1, 2), ("stage2", 2, 1)])
def test_sbatch_template_runs_a_stage(tiny_model_dir, tmp_path, stage, nodes, gpus):
    """One node with 2 GPUs, and 2 nodes with 1 GPU each (both nodes on this machine): the stage
    trains with world size 2, every task found the same master, and node ranks were 0..nodes-1."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    data = make_pairs(tmp_path / "d.jsonl", n=32, k=2)
    out = tmp_path / "run"
    proc = _sbatch(tmp_path, stage, ["engine=torch", "engine.precision=fp32", "engine.micro_batch_size=4",
                                     "engine.global_batch_size=8", "run.max_steps=2", "run.save_every=0",
                                     f"run.output_dir={out}", f"model.name_or_path={tiny_model_dir}",
                                     "model.init_from=null", f"data.train_files=[{data}]"],
                   nodes=nodes, gpus_per_node=gpus, nodelist=",".join(["localhost"] * nodes))
    banners = sorted(ln for ln in proc.stderr.splitlines() if ln.startswith("[train_slurm]"))
    assert len(banners) == nodes
    assert [b.split()[2] for b in banners] == [f"{r}/{nodes}" for r in range(nodes)]
    assert all(f"{gpus} processes, master localhost:" in b for b in banners)
    state = json.loads((out / "checkpoints" / "step_0000002" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_sbatch_template_refuses_an_unknown_stage(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train_slurm.sh"), "stage9"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage:")


@pytest.mark.slow
def test_synth_array_tasks_split_the_shards_and_the_last_assembles(tiny_model_dir, tmp_path):
    """scripts/synth_slurm.sh as `sbatch --array=3-5:2` runs it (task ids 3 and 5): each task takes the
    shards of its place in the array ((id - min) / step, not the raw id, which would be out of range), the
    first says it leaves the assembly to the last, the last assembles. Extra overrides pass through ARGS.
    Would catch a task index out of range (ids that do not start at 0), tasks taking the same shards, or
    an early assembly."""
    sys.path.insert(0, str(REPO / "tests" / "synth"))
    from test_pipeline import corpus

    docs = corpus(tmp_path / "c.jsonl", n=3)
    out = tmp_path / "synth"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PY=sys.executable, MODEL=str(tiny_model_dir), TP="1", OUT=str(out), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1", SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="3", SLURM_ARRAY_TASK_STEP="2",
               ARGS="backend=transformers shard_size=1 passage_words=60 min_passage_words=5 sampling.max_new_tokens=8 "
                    "task_mix={sts:1.0}")
    shards = lambda: sorted(p.name for p in (out / "shards").glob("shard_?????.jsonl"))  # noqa: E731
    first = subprocess.run(["bash", str(REPO / "scripts" / "synth_slurm.sh"), str(docs)], capture_output=True, text=True,
                           env=dict(env, SLURM_ARRAY_TASK_ID="5"), timeout=300, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    assert shards() == ["shard_00001.jsonl"] and not (out / "pairs.jsonl").exists()
    assert "this job is done (1 of the 3 shards); 1 of them exist" in first.stdout
    last = subprocess.run(["bash", str(REPO / "scripts" / "synth_slurm.sh"), str(docs)], capture_output=True, text=True,
                          env=dict(env, SLURM_ARRAY_TASK_ID="3"), timeout=300, cwd=REPO)
    assert last.returncode == 0, last.stderr[-3000:]
    assert len(shards()) == 3 and (out / "pairs.jsonl").exists()
    assert json.loads((out / "stats.json").read_text())["shards"] == 3
