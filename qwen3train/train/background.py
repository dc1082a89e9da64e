"""A checkpoint's files written while training goes on (``run.save_in_background``).

A save stops training only for as long as copying its tensors to host memory takes (``snapshot``: on a GPU a copy
into pinned memory at the link's speed; on the CPU a memcpy); writing the files (the engine state, the export),
hashing them and the manifest are done by a thread of the process (``Writer``) while the next steps run. The
checkpoint is moved into place (``checkpoint.Pending.finish``) at the first step boundary where every rank's
writer is done, so a kill before then leaves only the hidden ``.tmp`` folder, which no resume takes: the previous
checkpoint stays the last one, as when a kill comes during a save in the foreground.

What the snapshot costs: host memory for one copy of what the rank writes (the torch engine: the fp32 weights and
AdamW's two moments, ~12 bytes a parameter, on rank 0; DeepSpeed: each rank its ZeRO partition), held until the
files are written; FSDP: each rank its shards, copied by torch's checkpoint stager and kept from save to save
(``FSDPEngine._staged``). One save is in flight at a time: the next save, the final one, a stop on SIGTERM and the
end of the run wait for it first.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Callable

import torch


def snapshot(obj, memo: dict | None = None):
    """``obj`` (dicts, lists and tuples of tensors and plain values, as state dicts are) with every tensor copied to
    host memory, compact; tensors that were one (tied weights) or views of the same bytes stay one copy, so
    ``torch.save`` writes them once. Other objects are kept as they are (a state dict's numbers and strings).
    CUDA tensors go to pinned memory without waiting for each copy (one synchronisation at the end)."""
    memo = {} if memo is None else memo
    cuda = [False]

    def tensor(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.numel() == 0:
            return t.to("cpu", copy=True)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in memo:
            pin = t.is_cuda
            cuda[0] |= pin
            try:
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            except RuntimeError:  # no pinned memory to be had (a container's memlock limit): ordinary memory
                out = torch.empty(t.shape, dtype=t.dtype)
            memo[key] = out.copy_(t, non_blocking=pin)
            return memo[key]
        return memo[key].view(memo[key].shape)  # another tensor over the same bytes (a tied weight): one too

    seen: dict[int, object] = {}  # an object met twice is copied once: pickle then shares it as the original did

    def walk(x):
        if not isinstance(x, (torch.Tensor, dict, list, tuple)):
            return x
        if id(x) not in seen:
            if isinstance(x, torch.Tensor):
                out = tensor(x)
            elif isinstance(x, dict):
                out = copy.copy(x)  # the same kind of mapping (OrderedDict, defaultdict)
                for k, v in x.items():
                    out[k] = walk(v)
            elif isinstance(x, list):
                out = [walk(v) for v in x]
            else:
                items = [walk(v) for v in x]
                same = all(a is b for a, b in zip(items, x))  # immutable, nothing copied inside: itself
                out = x if same else type(x)(*items) if hasattr(x, "_fields") else tuple(items)
            seen[id(x)] = out
        return seen[id(x)]

    out = walk(obj)
    if cuda[0]:
        torch.cuda.synchronize()
    return out


class Writer:
    """The jobs of one save, in order: run on a thread of their own once ``start`` is called (``background``), or at
    once. ``written``: the files the jobs wrote (relative to the checkpoint folder); ``hashed``: manifest entries of
    some of them, taken by a job; ``error``: the first exception a job raised (the later jobs are not run)."""

    def __init__(self, folder: Path, background: bool) -> None:
        self.folder, self.background = folder, background
        self.jobs: list[Callable[[], None]] = []
        self.written: list[str] = []
        self.hashed: dict[str, dict] = {}  # manifest entries the jobs took of the files they wrote
        self.error: BaseException | None = None
        self.memo: dict = {}  # one save's copies: the export's weights reuse the engine state's
        self._thread: threading.Thread | None = None

    def save(self, write: Callable, obj, path: Path) -> None:
        """``write(obj, file)`` (``torch.save`` or DeepSpeed's writer) of a copy of ``obj`` taken now, into ``path``
        opened here: given a path, torch's zip writer holds the interpreter lock while it copies each tensor (up to
        ~100 ms for 200 MB: the training thread could launch nothing meanwhile); through a Python file it lets go of
        it (``bench/bench_save.py --gil``). The file's records are then named ``archive/...`` instead of after the
        file; ``torch.load`` reads both, and a save in the foreground or the background writes the same bytes."""
        if self.background:
            obj = snapshot(obj, self.memo)

        def job() -> None:
            with open(path, "wb") as f:
                write(obj, f)

        self.call(job, path)

    def call(self, job: Callable[[], None], *paths: Path) -> None:
        """A job that writes ``paths`` (files or folders, recorded as written once it has run)."""
        self.call_listing(lambda: (job(), paths)[1])

    def call_listing(self, job: Callable[[], "list[Path] | tuple[Path, ...]"]) -> None:
        """A job that returns the paths it wrote (names known only once written), recorded as written."""
        def run() -> None:
            self.written.extend(str(Path(p).relative_to(self.folder)) for p in job())

        if not self.background:  # at once, its error raised here
            run()
            return
        self.jobs.append(run)

    def start(self) -> None:
        if self.background:
            self._thread = threading.Thread(target=self._run, name="qwen3train-checkpoint-writer", daemon=True)
            self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while self.jobs and self.error is None:
            job = self.jobs.pop(0)
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - reported by the save's finish on every rank
                self.error = e
        self.memo.clear()
