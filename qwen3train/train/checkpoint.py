"""Checkpoints written atomically, pruned by rule, and resumed exactly.

Layout of ``<run>/checkpoints/step_0000100/``:
  ``engine/``            model + optimizer + scheduler state (torch file or DeepSpeed checkpoint)
  ``model/``             an ordinary export (Hugging Face + sentence-transformers): what merging reads
  ``rng_rank{r}.pt``     every rank's RNG states
  ``train_state.json``   step, epoch, position in the epoch's batch plan, samples seen
  ``checksums.json``     size and XXH3-128 of every file (``qwen3train.integrity``); ``model/`` has its own
Everything is written under ``.step_0000100.tmp`` and renamed into place once complete, so a kill
during a save never damages the last good checkpoint; leftover ``.tmp`` folders are ignored by resume and
removed when the run starts again (``clear_partial``). A full disk
during a save removes the partial folder and stops the run with one line (the previous checkpoint is
untouched). ``retire`` turns a finished run's checkpoints into exports only (the pipeline does it once a
stage is done); resume never takes those. On resume the newest checkpoint whose files match their checksums is used: a damaged one
(a copy cut short, a full disk, bit rot) is named in one line and skipped.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qwen3train import dist
from qwen3train.errors import ConfigError, DiskFull, disk_full
from qwen3train.integrity import (describe, entries, judged, listing, precheck, recorded, reusable, shares, verify,
                                  write_manifest)
from qwen3train.train.background import Writer, snapshot


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


# run folder -> the loop's finish of its save in flight (``begin`` in the background), so that an error naming the
# last checkpoint names the one it will leave: registered by the loop, removed by the finish
IN_FLIGHT: dict[str, Callable[[], None]] = {}


def settle(root: Path, collective: bool = False) -> None:
    """The save in flight of the run in ``root`` finished now: on one process always; with peers only where every
    rank calls this (``collective``), since finishing is collective; elsewhere it stays a ``.tmp`` folder."""
    finish = IN_FLIGHT.get(str(root))
    if finish is not None and (collective or dist.world_size() == 1):
        finish()


def kept_line(root: Path) -> str:
    """What a run that stops now leaves to resume from, for its one-line error (a one-process run's save in flight
    finished first)."""
    settle(root)
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
    """Collective: every rank calls it. A save in the foreground (``begin`` then ``Pending.finish``); returns the
    final checkpoint folder."""
    return begin(root, state, engine, task, export_model=export_model, engine_state=engine_state).finish(
        keep_last, keep_every, keep_steps)


def begin(root: Path, state: TrainState, engine, task, *, export_model: bool, engine_state: bool = True,
          background: bool = False) -> "Pending":
    """Collective: a save's files under ``.step_N.tmp``, written at once or (``background``) by a thread while
    training goes on, from copies taken now (train/background.py). ``engine_state=False`` (the last step of a run
    whose optimizer state would be removed anyway): the export and the train state only, marked not resumable, as
    ``retire`` leaves a checkpoint; ``finished_point`` finds it."""
    if not engine_state and not export_model:
        raise ValueError("a checkpoint without engine state must carry its export")
    final = step_dir(root, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    writer = Writer(tmp, background)
    try:
        if engine_state:
            engine.save(tmp / "engine", writer)
        full = engine.full_state_dict()
        if engine_state:
            writer.save(torch.save, _rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
        if dist.is_main():
            if export_model:
                _export(writer, task, tmp / "model", full)
            text = json.dumps(dict(asdict(state), resumable=engine_state), indent=2)
            writer.call(lambda: (tmp / "train_state.json").write_text(text), tmp / "train_state.json")
        if background:  # the files this rank wrote, hashed by its writer (the export has its own manifest)
            writer.call(lambda: writer.hashed.update(entries(tmp, [r for r in writer.written if r != "model"])))
        writer.start()
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        raise _no_space(root, final, tmp) from None
    return Pending(root, final, tmp, writer, state.step, export_model)


def _export(writer: Writer, task, out: Path, full: dict | None) -> None:
    """The export job. In the background it writes a copy of the weights taken now (the engine's, when they are
    the module's own: the copy of the engine state is reused), and the tokenizer copy it writes is made now, on
    this thread, since making it reads the tokenizer the data thread uses."""
    if writer.background:
        task.export_ready()
        local = [getattr(p, "_local_tensor", p) for p in task.module.parameters()]  # an FSDP shard's own tensor
        params = {t.untyped_storage().data_ptr() for t in local if t.numel()}
        if full is None or any(torch.is_tensor(v) and v.numel() and v.untyped_storage().data_ptr() in params
                               for v in full.values()):  # weights the module trains on: not a copy yet
            full = snapshot(full if full is not None else task.module.state_dict(), writer.memo)
    writer.call(lambda: (task.export(out, state_dict=full), write_manifest(out)), out)


def _no_space(root: Path, final: Path, tmp: Path) -> DiskFull:
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(root)
    return DiskFull(f"no space left on the device while saving {final.name} under {root / 'checkpoints'}; "
                    f"the partial save was removed and {f'{previous.name} is intact' if previous else 'no earlier checkpoint exists'}: "
                    f"free space and rerun the same command to resume")


class Pending:
    """A save begun: its files written (or being written) under ``tmp``; ``finish`` moves it into place."""

    # a wait for a background writer this long (seconds) is named: the steps stood still for it
    NAMED_WAIT = 1.0

    def __init__(self, root: Path, final: Path, tmp: Path, writer: Writer, step: int, export: bool) -> None:
        self.root, self.final, self.tmp, self.writer, self.step, self.export = root, final, tmp, writer, step, export
        self.begun = time.monotonic()

    def busy(self) -> bool:
        """This rank's writer is still writing (the loop asks every rank at a step boundary)."""
        return self.writer.busy()

    def finish(self, keep_last: int, keep_every: int, keep_steps: tuple[int, ...] = ()) -> Path:
        """Collective: once every rank's writer is done, the manifest (the files each writer hashed, the export's own
        digests, the rest dealt to the ranks), the folder moved into place, the older ones pruned. A writer's failure
        stops every rank: a full disk with the one line a save in the foreground gives, anything else as an error
        naming the rank (its own exception on that rank). A wait of ``NAMED_WAIT`` s or more for this rank's writer
        (the next save came before its files were written) is named in a note on rank 0."""
        t, busy = time.monotonic(), self.writer.busy()
        self.writer.wait()
        waited = time.monotonic() - t
        if busy and waited >= self.NAMED_WAIT and dist.is_main():
            print(f"note: training waited {waited:.1f} s for the background write of {self.final.name} (begun "
                  f"{time.monotonic() - self.begun:.1f} s before); if saves often wait, raise run.save_every", flush=True)
        err = self.writer.error
        failed = dist.all_gather_object(None if err is None else (disk_full(err), f"{type(err).__name__}: {err}"))
        if any(f is not None and f[0] for f in failed):
            raise _no_space(self.root, self.final, self.tmp) if dist.is_main() else \
                DiskFull(f"no space left on the device while saving {self.final.name}") from None
        if err is not None:
            raise err
        for r, f in enumerate(failed):
            if f is not None:
                raise RuntimeError(f"saving {self.final.name} failed on rank {r} ({f[1]})")
        try:
            files = hash_together(self.tmp, self.writer.hashed if self.writer.background else None)
            if dist.is_main():
                write_manifest(self.tmp, files)
        except (OSError, RuntimeError) as e:
            if not disk_full(e):
                raise
            raise _no_space(self.root, self.final, self.tmp) from None
        if dist.is_main():
            if self.final.exists():
                shutil.rmtree(self.final)
            self.tmp.rename(self.final)
            prune(self.root, keep_last, keep_every, keep_steps)
        dist.barrier()
        return self.final


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


def hash_together(folder: Path, own: dict | None = None) -> dict | None:
    """Collective: the manifest entries of a checkpoint's files, for rank 0 (None elsewhere). Every rank hashes a
    share (engine shards, the export's weights) at once, and the export's files keep the digests its own
    manifest took a moment ago, the files a rank's background writer wrote the digests it took (``own``): nothing
    is read twice, and no rank reads the whole checkpoint alone."""
    known, todo = {}, None
    mine = [] if own is None else dist.all_gather_object(own)  # (None on every rank, or a dict on every rank)
    if dist.is_main():
        sizes = listing(folder)
        known = reusable({f"model/{rel}": e for rel, e in recorded(folder / "model").items()}, sizes)
        for part in mine:
            known.update(reusable(part, sizes))
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


def clear_partial(root: Path) -> None:
    """Rank 0, as a run starts (no save of it in flight): the hidden ``.step_N.tmp`` folders of saves a kill or an
    error cut short go, named in one line with the space they held. No resume takes them, and each can hold a
    whole checkpoint; a save at the same step replaced its own, but one at a step the run no longer saves at (another
    ``run.save_every``, a run stopped before it) stayed for good."""
    if not dist.is_main() or not (root / "checkpoints").is_dir():
        return
    partial = sorted((root / "checkpoints").glob(".step_*.tmp"))
    if not partial:
        return
    size = sum(f.stat().st_size for p in partial for f in p.rglob("*") if f.is_file())
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    print(f"note: removed {len(partial)} partial save(s) that a kill or an error left ({', '.join(p.name for p in partial)}, "
          f"{size / 2**30:.2f} GiB): no resume takes them", flush=True)


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
