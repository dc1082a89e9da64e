"""Checkpoints written atomically, pruned by rule, and resumed exactly.

Layout of ``<run>/checkpoints/step_0000100/``:
  ``engine/``            model + optimizer + scheduler state (torch file or DeepSpeed checkpoint)
  ``model/``             an ordinary export (Hugging Face + sentence-transformers): what merging reads
  ``rng_rank{r}.pt``     every rank's RNG states
  ``train_state.json``   step, epoch, position in the epoch's batch plan, samples seen
Everything is written under ``.step_0000100.tmp`` and renamed into place once complete, so a kill
during a save never damages the last good checkpoint; leftover ``.tmp`` folders are ignored.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3train import dist


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # next batch of the epoch's plan
    samples: int = 0
    world_size: int | None = None  # processes that wrote the checkpoint (ZeRO state resumes only on as many)
    cursors: list | None = None  # per data source [epoch, next batch] (data.mixture; data.loader.Loader)


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    base = root / "checkpoints"
    if not base.exists():
        return []
    done = [p for p in base.glob("step_*") if (p / "train_state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, state: TrainState, engine, task, *, export_model: bool, keep_last: int,
         keep_every: int, keep_steps: tuple[int, ...] = ()) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    final = step_dir(root, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save(tmp / "engine")
    full = engine.full_state_dict()
    torch.save(_rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    if dist.is_main():
        if export_model:
            task.export(tmp / "model", state_dict=full)
        (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=2))
    dist.barrier()
    if dist.is_main():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune(root, keep_last, keep_every, keep_steps)
    dist.barrier()
    return final


def prune(root: Path, keep_last: int, keep_every: int, keep_steps: tuple[int, ...] = ()) -> None:
    """Keep the last ``keep_last`` checkpoints, every one whose step is a multiple of ``keep_every`` and
    the steps in ``keep_steps`` (the best by dev score)."""
    found = list_checkpoints(root)
    keep = set(found[-keep_last:]) if keep_last > 0 else set(found)
    for p in found:
        step = int(p.name.split("_")[1])
        if p not in keep and step not in keep_steps and not (keep_every > 0 and step % keep_every == 0):
            shutil.rmtree(p, ignore_errors=True)


def load(path: Path, engine) -> TrainState:
    """Resume from ``path``. The torch engine resumes on any process count (its state is replicated);
    a rank that did not exist when the checkpoint was written starts from its current RNG state."""
    state = TrainState(**json.loads((path / "train_state.json").read_text()))
    engine.load(path / "engine", saved_world=state.world_size)
    rng = path / f"rng_rank{dist.rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
