"""engine=fsdp (torch's FSDP2, no DeepSpeed) with gloo processes, through the real entry point: on 4 processes with
hybrid sharding (2 copies of 2 shards; ranks 1-3 built without weights, filled from rank 0) it trains as the torch
engine does on one process (GradCache, packed, activation checkpointing, the memory rehearsal, layers kept gathered
from forward to backward), its sharded checkpoint resumes on 1 process, the reranker trains under it on 2 processes
with LoRA in bf16, and its exports are the torch engine's; ranks that built different models stop together."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, crash_report
from test_deepspeed import ENV, _same_curve, command, group_threads_at_exit, launch, probed


def _same_steps(ref, got, tol):
    """``test_deepspeed._same_curve`` for runs of any length: loss and grad norm of each step, relative."""
    assert len(got) == len(ref) and [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= tol * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= tol * max(1.0, a["grad_norm"]), (a["step"], a["grad_norm"],
                                                                                         b["grad_norm"])


def _weights(run) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def _rerank_launch(out, model_dir, data, overrides, nproc):
    cmd = command(out, model_dir, data, overrides, nproc=nproc)
    cmd[cmd.index("--config-name=stage2")] = "--config-name=rerank"
    proc = subprocess.run(cmd, env=probed(out), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + crash_report(proc, 4000)
    (out / "stdout.log").write_text(proc.stdout)
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    tmp = tmp_path_factory.mktemp("fsdp")
    data = make_pairs(tmp / "d.jsonl", n=64, k=2)
    fp32 = ["engine.precision=fp32"]
    # 4 steps, checkpoints at 2 and 4: the resumed run below takes two steps, so the schedule it restores counts
    out = {"torch": launch(tmp / "torch", tiny_model_dir, data, ["engine=torch", *fp32], steps=4)}
    # 4 processes, hybrid sharding (2 copies of the state, each sharded over 2), fp32, rehearsed after step 1 (a
    # dropped step: the curve must not move), with activation checkpointing (the Qwen3 model configs' default: each
    # layer's forward runs again inside its backward), each layer's weights kept gathered from forward to backward
    # (across GradCache's no-grad pass too); ranks 1-3 built without weights
    hsdp = ["engine=fsdp", *fp32, "engine.fsdp_shard_size=2", "engine.rehearse_memory=true",
            "model.gradient_checkpointing=true", "engine.fsdp_reshard_after_forward=false"]
    # its step-2 checkpoint written in the background (run.save_in_background=true, the CUDA default), rank 0's
    # first write of it held 6 s (a slow disk): step 3 trains meanwhile
    out["hsdp"] = launch(tmp / "hsdp", tiny_model_dir, data, hsdp, steps=4, nproc=4, fault="slow:0:torch.save:6:1")
    # that run stopped after step 2 (its step-2 checkpoint), resumed on one process
    shutil.copytree(tmp / "hsdp", tmp / "resumed")
    shutil.rmtree(tmp / "resumed" / "checkpoints" / "step_0000004")
    shutil.rmtree(tmp / "resumed" / "final")
    cmd = command(tmp / "resumed", tiny_model_dir, data, hsdp, nproc=1, steps=4)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, crash_report(proc)
    out["resumed_log"] = proc.stdout
    lora = ["engine.precision=bf16", "model.lora.enabled=true", "engine.grad_cache=false"]
    out["rr-torch"] = _rerank_launch(tmp / "rr-torch", tiny_model_dir, data, ["engine=torch", *lora], 1)
    # two processes: rank 1 builds the LM (tied head, LoRA, frozen bf16 base) without weights and receives rank 0's
    out["rr-fsdp"] = _rerank_launch(tmp / "rr-fsdp", tiny_model_dir, data, ["engine=fsdp", *lora], 2)
    out["_dir"] = tmp
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_fsdp_on_four_processes_trains_and_exports_as_the_torch_engine_on_one(runs):
    """Hybrid sharding on 4 processes (engine.fsdp_shard_size=2): a 2-D mesh, each parameter replicated over 2 copies
    and sharded within each (read off a parameter's placements); gradients reduce-scattered in a copy, all-reduced
    across, averaged over all 4. Same losses, gradient norms (the norm over every shard) and final weights as the
    torch engine on 1 process, to fp32 rounding, with each layer kept gathered from forward to backward. Would catch:
    the size ignored (a 1-D mesh: the placements), gradients summed instead of averaged (the norm doubles), a shard
    left out of the norm or of the clipping, a unit whose parameters are not gathered for encode's direct call of the
    backbone (an error), a rank that did not receive rank 0's starting weights (checked to fail when the rotary
    buffers, not in the state dict, are not sent), a rehearsal step that moved the weights, an export of one rank's
    shards, the mesh's groups alive at exit."""
    tmp = runs["_dir"]
    log = (tmp / "hsdp" / "stdout.log").read_text()
    assert ("hybrid sharding, 2 copies of the model's state, each sharded over 2 processes (placements (Replicate(), "
            "Shard(dim=0)))") in log
    assert "rank 0 read the weights; 3 of the 3 other ranks built the model without them" in log
    assert "memory rehearsal: the heaviest micro batch" in log
    _same_steps(runs["torch"], runs["hsdp"], 1e-5)
    a, b = _weights(tmp / "torch"), _weights(tmp / "hsdp")
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert (tmp / "hsdp" / "checkpoints" / "step_0000002" / "engine" / "fsdp").is_dir()
    assert group_threads_at_exit(tmp / "hsdp", ranks=(0, 1, 2, 3)) == {0: [], 1: [], 2: [], 3: []}


@pytest.mark.slow
def test_an_fsdp_checkpoint_of_four_processes_resumes_on_one_as_if_never_stopped(runs):
    """The step-2 checkpoint of the 4-process hybrid run (each rank's shards of the weights and AdamW moments, one
    copy's written), resumed on 1 process: steps 3-4 and the final weights are the uninterrupted run's. Would catch:
    moments or schedule not restored (step 3's or step 4's update differs; checked on a 2-process run: without the
    schedule's restore the weights differ), shards read unresharded (an error or part of the weights), weights
    restored but not the optimizer. The checkpoint was written in the background while step 3 ran (its row says a
    rank was still writing): its shards are copies taken at step 2 (the files of a save in the foreground, in a
    2-process run checked by hand); one rank's written from the live ones (the copies removed) hold step 3's."""
    tmp = runs["_dir"]
    assert [r.get("checkpoint_writing", 0) > 0 for r in runs["hsdp"][:3]] == [False, False, True], runs["hsdp"]
    assert "written by 4 processes; its FSDP shards were read resharded for 1" in runs["resumed_log"]
    got = [json.loads(line) for line in open(tmp / "resumed" / "metrics.jsonl")]
    _same_steps(runs["hsdp"], got, 1e-6)
    a, b = _weights(tmp / "hsdp"), _weights(tmp / "resumed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_the_reranker_trains_lora_in_bf16_under_fsdp_as_under_the_torch_engine(runs, tiny_model_dir):
    """The reranker's forward reads two LM-head rows outside the decoder: under FSDP they must be gathered. On 2
    processes, rank 1 built without weights: its tied LM head, its adapters and its bf16 base come from rank 0. LoRA
    (frozen and trainable weights in one unit) in bf16 (FSDP's bf16 weight copies vs the torch engine's autocast:
    not bit-equal, so within bf16's rounding) follows the torch engine, and the export holds the same weights under
    the same names, the tied LM head once (gathering copied it: an export wrote it a second time)."""
    tmp = runs["_dir"]
    assert "1 of the 1 other ranks built the model without them" in (tmp / "rr-fsdp" / "stdout.log").read_text()
    _same_curve(runs["rr-torch"], runs["rr-fsdp"], 1e-2, 2e-2)
    assert runs["rr-fsdp"][-1]["loss"] != runs["rr-fsdp"][0]["loss"]
    a, b = _weights(tmp / "rr-torch"), _weights(tmp / "rr-fsdp")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    da, db = a[key].float() - base[key].float(), b[key].float() - base[key].float()
    assert da.norm() > 0 and torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0) > 0.98


RANKS_DIFFER = """
import sys
from pathlib import Path
from torch import nn
from qwen3train import dist
from qwen3train.train.fsdp_engine import same_structure
dist.init()
same_structure(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))  # the same on both ranks: passes
try:
    same_structure(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2 + dist.rank())))
    said = "went on"
except RuntimeError as e:  # kept, and a clean exit: torchrun stops the other ranks when one fails
    said = str(e)
(Path(sys.argv[1]) / f"rank{dist.rank()}.txt").write_text(said)
dist.barrier()  # where a rank that went on waits for one that stopped
"""


def test_ranks_that_built_another_model_stop_together_naming_the_difference(tmp_path):
    """engine.fsdp_load=rank0 sends rank 0's weights into every rank's shards: a rank whose weightless build differs
    (a layer's shape, an untied head) would hang or crash inside the broadcast. Every rank stops at once with the
    first difference, rank 1's second layer here; would catch a check on rank 0 only or on rank 1 only (the other
    goes on to wait in a collective) or none."""
    script = tmp_path / "differ.py"
    script.write_text(RANKS_DIFFER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, crash_report(proc)
    for rank in (0, 1):
        line = (tmp_path / f"rank{rank}.txt").read_text()
        assert "rank 1 built the model without weights differently from rank 0" in line
        assert "('1.weight', (3, 3), 'torch.float32', True, '1.weight') vs rank 0's ('1.weight', (2, 3)" in line
        assert "engine.fsdp_load=every_rank" in line


def test_fsdp_settings_are_checked_before_anything_loads():
    """engine.fsdp_shard_size: a hybrid mesh only where it divides the processes into groups of that size; at least
    the process count (a run resumed on fewer GPUs) or null is plain FSDP; a size that does not divide is one line
    (the run checks it before the model loads, as it does the batch split), not torch's mesh error; either setting on another engine or a misspelt load is refused."""
    from qwen3train.errors import ConfigError
    from qwen3train.train.engine import EngineConfig

    def shard(size, world):
        return EngineConfig(backend="fsdp", fsdp_shard_size=size).hybrid_shard(world)

    assert [shard(s, 8) for s in (None, 1, 2, 4, 8, 16)] == [None, 1, 2, 4, None, None]
    with pytest.raises(ConfigError, match="engine.fsdp_shard_size=3 does not divide the 8 processes"):
        shard(3, 8)
    with pytest.raises(ValueError, match="engine.fsdp_shard_size needs engine=fsdp"):
        EngineConfig(backend="torch", fsdp_shard_size=2)
    with pytest.raises(ValueError, match="needs engine=fsdp and a value >= 1, got 0"):
        EngineConfig(backend="fsdp", fsdp_shard_size=0)
    with pytest.raises(ValueError, match="engine.fsdp_reshard_after_forward=false needs engine=fsdp"):
        EngineConfig(backend="deepspeed", fsdp_reshard_after_forward=False)
    with pytest.raises(ValueError, match="engine.fsdp_load must be one of"):
        EngineConfig(backend="fsdp", fsdp_load="rank_0")
    # shard groups are consecutive ranks: with 8 a node, 16 (two whole nodes) or 4 (half a node) keep groups whole,
    # 6 or 12 do not (a group across two nodes: its gathers cross them); one node alone has nothing to straddle
    notes = {s: EngineConfig(backend="fsdp", fsdp_shard_size=s).shard_groups_note(32, 8) for s in (4, 16, 8, 2)}
    assert notes == {4: None, 16: None, 8: None, 2: None}
    assert "fsdp_shard_size=12 with 8 processes a node: some shard groups span two nodes" in (
        EngineConfig(backend="fsdp", fsdp_shard_size=12).shard_groups_note(48, 8))
    assert EngineConfig(backend="fsdp", fsdp_shard_size=6).shard_groups_note(24, 8) is not None
    assert EngineConfig(backend="fsdp", fsdp_shard_size=2).shard_groups_note(4, 4) is None
    assert EngineConfig(backend="fsdp").broadcast_load(2) and not EngineConfig(backend="fsdp").broadcast_load(1)
    assert not EngineConfig(backend="fsdp", fsdp_load="every_rank").broadcast_load(2)
    assert not EngineConfig(backend="deepspeed", zero_stage=3).broadcast_load(2)
