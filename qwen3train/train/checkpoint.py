"""Checkpoints written atomically, pruned by rule, and resumed exactly.

Layout of ``<run>/checkpoints/step_0000100/``:
  ``engine/``            model + optimizer + scheduler state (torch file or DeepSpeed checkpoint)
  ``model/``             an ordinary export (Hugging Face + sentence-transformers): what merging reads
  ``rng_rank{r}.pt``     every rank's RNG states
  ``train_state.json``   step, epoch, position in the epoch's batch plan, samples seen
  ``checksums.json``     size and XXH3-128 of every file (``qwen3train.integrity``); ``model/`` has its own
Everything is written under ``.step_0000100.tmp`` and renamed into place once complete, so a kill
during a save never damages the last good checkpoint; leftover ``.tmp`` folders are ignored. A full disk
during a save removes the partial folder and stops the run with one line (the previous checkpoint is
untouched). ``retire`` turns a finished run's checkpoints into exports only (the pipeline does it once a
stage is done); resume never takes those. On resume the newest checkpoint whose files match their checksums is used: a damaged one
(a copy cut short, a full disk, bit rot) is named in one line and skipped.
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
from qwen3train.errors import ConfigError, DiskFull, disk_full
from qwen3train.integrity import (describe, entries, judged, listing, precheck, recorded, reusable, shares, verify,
                                  write_manifest)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # next batch of the epoch's plan
    samples: int = 0
    world_size: int | None = None  # processes that wrote the checkpoint (ZeRO state on another count: resharded)
    cursors: list | None = None  # per data source [epoch, next batch] (data.mixture; data.loader.Loader)
    resumable: bool = True  # False once ``retire`` removed the engine state (the export stays)
    plan: int = 1  # ``data.batching`` plan version the run's batches follow (absent before version 2: 1)


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


def kept_line(root: Path) -> str:
    """What a run that stops now leaves to resume from, for its one-line error."""
    last = latest_checkpoint(root)
    return f"the last checkpoint {last} is intact" if last else "no checkpoint yet (a rerun starts over)"


def plan_version(root: Path, current: int) -> int:
    """The batch plan version of the run in ``root``: its newest checkpoint's (1 if it has none recorded);
    ``current`` for a run with no checkpoint yet."""
    last = latest_checkpoint(root)
    try:
        return int(json.loads((last / "train_state.json").read_text()).get("plan", 1)) if last else current
    except (OSError, ValueError):
        return current  # a damaged state file: resume_point names it and falls back; the version is the run's


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
         keep_every: int, keep_steps: tuple[int, ...] = (), engine_state: bool = True) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. ``engine_state=False`` (the
    last step of a run whose optimizer state would be removed anyway): the export and the train state only,
    marked not resumable, as ``retire`` leaves a checkpoint; ``finished_point`` finds it."""
    if not engine_state and not export_model:
        raise ValueError("a checkpoint without engine state must carry its export")
    final = step_dir(root, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        if engine_state:
            engine.save(tmp / "engine")
        full = engine.full_state_dict()
        if engine_state:
            torch.save(_rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
        if dist.is_main():
            if export_model:
                task.export(tmp / "model", state_dict=full)
                write_manifest(tmp / "model")  # the export checks itself where it is read (merge, eval)
            (tmp / "train_state.json").write_text(json.dumps(dict(asdict(state), resumable=engine_state), indent=2))
        dist.barrier()
        files = hash_together(tmp)
        if dist.is_main():
            write_manifest(tmp, files)
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise DiskFull(f"no space left on the device while saving {final.name} under {root / 'checkpoints'}; "
                          f"the partial save was removed and {f'{previous.name} is intact' if previous else 'no earlier checkpoint exists'}: "
                          f"free space and rerun the same command to resume") from None
    if dist.is_main():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune(root, keep_last, keep_every, keep_steps)
    dist.barrier()
    return final


def _hashed_together(folder: Path, sizes: dict[str, int]) -> dict | None:
    """Collective (``sizes`` the same on every rank): these files' manifest entries, each rank hashing the share
    ``shares`` deals it by bytes; for rank 0 (None elsewhere). A file some rank cannot see (a disk of its own)
    is hashed by rank 0."""
    mine = entries(folder, shares(sizes, dist.world_size())[dist.rank()], unseen_ok=dist.rank() > 0)
    got = dist.all_gather_object(mine)
    if not dist.is_main():
        return None
    files = {}
    for part in got:
        files.update(part)
    files.update(entries(folder, [rel for rel, e in files.items() if e is None]))
    return files


def hash_together(folder: Path) -> dict | None:
    """Collective: the manifest entries of a checkpoint's files, for rank 0 (None elsewhere). Every rank hashes a
    share (engine shards, the export's weights) at once, and the export's files keep the digests its own
    manifest took a moment ago: nothing is read twice, and no rank reads the whole checkpoint alone."""
    known, todo = {}, None
    if dist.is_main():
        sizes = listing(folder)
        known = reusable({f"model/{rel}": e for rel, e in recorded(folder / "model").items()}, sizes)
        todo = {rel: n for rel, n in sizes.items() if rel not in known}
    files = _hashed_together(folder, dist.broadcast_object(todo))
    return {**known, **files} if dist.is_main() else None


def verify_together(folder: Path) -> list[str] | None:
    """Collective: ``verify(folder)``, every rank's answer, with the files dealt to the ranks to read (resuming
    an 8-GPU ZeRO-3 run reads every rank's shards: not rank 0 alone while the others wait)."""
    pre = dist.broadcast_object(precheck(folder) if dist.is_main() else None)
    if not isinstance(pre, tuple):
        return pre
    files, found, present = pre
    got = _hashed_together(folder, present)
    return dist.broadcast_object(judged(files, found, got) if dist.is_main() else None)


def retire(path: Path) -> int:
    """Make a finished run's checkpoint export-only: its engine state (weights, optimizer moments,
    scheduler; ~12 bytes a parameter under AdamW) and RNG files go, its exported model (what merging and
    evaluation read) stays. It is marked not resumable and its checksums are rewritten. Bytes freed (0 when
    already retired or when it has no export, which is then all there is)."""
    state_file = path / "train_state.json"
    if not (path / "model").is_dir() or not state_file.exists():
        return 0
    doomed = ([f for f in (path / "engine").rglob("*") if f.is_file()] if (path / "engine").exists() else []) + \
        sorted(path.glob("rng_rank*.pt"))
    state = json.loads(state_file.read_text())
    if not doomed and state.get("resumable", True) is False:
        return 0
    freed = sum(f.stat().st_size for f in doomed)
    state["resumable"] = False  # first: a kill from here on leaves a checkpoint that no resume takes
    tmp = state_file.with_name(".train_state.json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file)
    shutil.rmtree(path / "engine", ignore_errors=True)
    for f in path.glob("rng_rank*.pt"):
        f.unlink()
    sizes = listing(path)  # what is left was hashed when it was saved, but for the state file just rewritten
    files = reusable({rel: e for rel, e in recorded(path).items() if rel != state_file.name}, sizes)
    write_manifest(path, {**files, **entries(path, [rel for rel in sizes if rel not in files])})
    return freed


def resume_point(root: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums (the ranks read its files together, every rank
    gets the answer). Damaged ones are named in one line each and skipped; when every one is damaged the run stops
    with one line. Checkpoints without checksums (older versions) are trusted."""
    chosen, damaged, retired = None, [], []
    found = dist.broadcast_object([(path, _resumable(path)) for path in reversed(list_checkpoints(root))]
                                  if dist.is_main() else None)
    for path, resumable in found:  # every rank in step: each verification is collective
        if not resumable:
            retired.append(path)
            continue
        problems = verify_together(path)
        if not problems:
            chosen = path
            break
        damaged.append(path)
        if dist.is_main():
            print(f"warning: checkpoint {path} is damaged ({describe(problems)}): skipped, trying the one before",
                  flush=True)
    if chosen is None and retired and not damaged:
        raise ConfigError(f"the checkpoints under {root / 'checkpoints'} ({', '.join(p.name for p in retired)}) keep only "
                          f"their exported model (their run finished and the pipeline removed the optimizer state: "
                          f"keep_engine_state=false), so none can resume; train on from one with model.init_from="
                          f"{retired[0] / 'model'}, or start over with run.resume=never")
    if chosen is None and damaged:
        raise ConfigError(f"every checkpoint under {root / 'checkpoints'} is damaged ({', '.join(p.name for p in damaged)}); "
                          f"restore one, or start over with run.resume=never")
    return chosen


def finished_point(root: Path, total: int) -> Path | None:
    """The newest checkpoint when it is an export-only one at step ``total`` or later whose files match their
    checksums: the run trained to the end (a kill came before the final model was copied out); None else."""
    found = list_checkpoints(root)
    if not found or _resumable(found[-1]):
        return None
    try:
        step = json.loads((found[-1] / "train_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None
    return found[-1] if step >= total and not verify(found[-1]) else None


def _resumable(path: Path) -> bool:
    try:
        return json.loads((path / "train_state.json").read_text()).get("resumable", True) is not False
    except (OSError, ValueError):
        return True  # unreadable: verify() names it as damaged


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
    """Resume from ``path``, on any process count (the torch engine's state is replicated; a ZeRO checkpoint
    is resharded: train/reshard.py); a rank that did not exist when the checkpoint was written starts from
    its current RNG state."""
    state = TrainState(**json.loads((path / "train_state.json").read_text()))
    if dist.is_main():  # a ZeRO resharding a kill interrupted leaves a copy of the optimizer state (reshard.py)
        for stale in path.parent.glob(".resharded-*"):
            shutil.rmtree(stale, ignore_errors=True)
    engine.load(path / "engine", saved_world=state.world_size)
    rng = path / f"rng_rank{dist.rank()}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state
