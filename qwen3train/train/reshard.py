"""A ZeRO checkpoint resumed on another process count: made whole, then split anew.

ZeRO partitions the fp32 weights and the Adam moments by rank (stage 1-3; stage 3 the weights too), so a
checkpoint written by 8 processes holds 8 slices of each. A run requeued on 4 GPUs, or grown to 16, used to be
refused. Here rank 0 converts the checkpoint into DeepSpeed's universal form (``ds_to_universal``: each
parameter's fp32 weights and moments whole, in a file of its own), every rank loads its own slice of it
(``deepspeed_engine.DeepSpeedEngine._load_resharded``), and the converted copy goes. The checkpoint itself is only read
(its files are verified on resume: ``checkpoint.verify``), so a kill at any point leaves it as it was; the
next resume removes the partial copy (``checkpoint.load``, on any process count) and converts again if needed.

The conversion runs in a process of its own (``python -m deepspeed.checkpoint.ds_to_universal``: its worker
processes fork from a clean process, not from a rank holding CUDA and a process group, and its memory, a full
copy of the optimizer state, goes back when it ends). It needs disk for that copy beside the checkpoints. The
other ranks wait for its marker file, not in a collective: converting a large model's state can take longer
than the process group's timeout.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qwen3train import dist
from qwen3train.errors import ConfigError


CONVERTER = "deepspeed.checkpoint.ds_to_universal"  # run as ``python -m``


def to_universal(src: Path, out: Path, failure: str) -> tuple[Path, float]:
    """``src`` (a DeepSpeed checkpoint folder) converted into ``out``/universal by rank 0; every rank returns it
    once it is there, with the seconds the conversion took. ``failure``: what to do instead, for the one-line
    error if the conversion fails. A copy a killed conversion left is gone by now (``checkpoint.load``)."""
    token = dist.broadcast_object(secrets.token_hex(8) if dist.is_main() else None)  # this attempt's marker
    marker = out / "converted"
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, min(8, cpus // 2))
        cmd = [sys.executable, "-m", CONVERTER, "--input_folder", str(src),
               "--output_folder", str(out / "universal"), "--inject_missing_state",
               "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [x for x in (proc.stderr + proc.stdout).strip().splitlines() if x.strip()]
            why = f"DeepSpeed's ds_to_universal failed: {lines[-1] if lines else f'status {proc.returncode}'}"
            marker.write_text(f"{token}\nfailed\n{why}\n")
            raise ConfigError(f"{why}; {failure}")
        seconds = time.perf_counter() - t0
        marker.write_text(f"{token}\nok\n{seconds:.1f}\n")
    else:
        while True:
            try:
                got = marker.read_text().splitlines()
            except OSError:
                got = []
            if len(got) >= 3 and got[0] == token:
                break
            time.sleep(1.0)
        if got[1] != "ok":
            raise ConfigError(f"{got[2]}; {failure}")
        seconds = float(got[2])
    dist.barrier()
    return out / "universal", seconds


def hyperparameters(optimizer) -> list[dict]:
    """Each parameter group's own settings but the learning rate (the schedule's, which the load restores)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]


def repair(optimizer, own: list[dict]) -> None:
    """Undo what ZeRO-3's universal load does wrong (DeepSpeed 0.19.8): it gives every parameter group the
    first group's settings (the no-decay group would decay) and one step tensor to share, which each group's
    update then advances (the second group's bias correction a step ahead). Each group gets its own settings
    back (``own``, from ``hyperparameters`` before the load) and each state its own step."""
    for group, kept in zip(optimizer.param_groups, own):
        group.update(kept)
    for state in getattr(getattr(optimizer, "optimizer", None), "state", {}).values():
        step = state.get("step")
        if hasattr(step, "clone"):
            state["step"] = step.clone()


def remove(out: Path) -> None:
    """The converted copy, once every rank has loaded its slice."""
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(out, ignore_errors=True)
