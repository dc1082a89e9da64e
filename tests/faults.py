"""Faults injected into real runs, for the tests of what a run does when they happen far into it.

* ``nonfinite(steps)``: the loss of those optimizer steps (counted from 1 in each process) is multiplied by
  NaN; the forward, the backward and the engine's step are the real ones, so every gradient is NaN, as
  after an overflow or a batch that breaks the loss (``run.skip_nonfinite_steps``).
* ``disk_full(module, name, where, call)``: the ``call``-th call of ``module.name`` (a writer: ``numpy.save``)
  on a file whose path contains ``where`` writes a few bytes to it and then fails as a full disk does
  (``ENOSPC``).
* ``memory_ceiling(tokens)``: a device that holds the activations of ``tokens`` tokens: a forward that builds
  a graph (training's, not GradCache's first pass) over more real tokens raises the out-of-memory error CUDA
  raises (``torch.OutOfMemoryError``), from inside the engine's forward, as a real one does; ``wrapped``: a
  ``RuntimeError`` raised from it, as compiled code may report one.

* ``slow(rank, module, name, seconds, call=1)``: on that rank (``RANK``; 0 without torchrun) the ``call``-th call
  of ``module.name`` waits ``seconds`` first, as a read stuck on a network filesystem does; the other ranks go on
  to their next collective and wait there.

* ``inference_ceiling(tokens)``: the same device for inference (``encode``, the reranker's scoring): a
  forward without a graph over more than ``tokens`` tokens (padded: rows x width; packed: the rows' tokens)
  raises that error, counted in ``ATTEMPTS``.

Each returns an undo. As a script, under torchrun too, it runs the command line with the faults of
``QWEN3TRAIN_TEST_FAULT`` (``nonfinite:2,3``, ``memory_ceiling:300``, ``slow:1:numpy.save:4`` (``slow:0:torch.save:600:3``: its third call), ``inference_ceiling:40``, ``abort_at_exit``, ``reshard_fails``, ``cuda_memory_fraction:0.01`` or ``disk_full:numpy.save:.parts/:2``; several
joined by ``;``):
``QWEN3TRAIN_TEST_FAULT=nonfinite:2 python tests/faults.py --config-name=stage2 key=value ...``."""

from __future__ import annotations

import errno
import importlib
import os
import runpy
import sys


def nonfinite(steps):
    from qwen3train.train import loop

    steps, original, count = set(steps), loop.train_step, [0]

    def train_step(engine, task, batch, *args, **kwargs):
        count[0] += 1
        if count[0] not in steps:
            return original(engine, task, batch, *args, **kwargs)
        real = task.loss

        def poisoned(*a, **k):
            loss, stats = real(*a, **k)
            return loss * float("nan"), stats

        task.loss = poisoned  # an attribute of this instance, over the class's method, for this step only
        try:
            return original(engine, task, batch, *args, **kwargs)
        finally:
            del task.loss

    loop.train_step = train_step
    return lambda: setattr(loop, "train_step", original)


def disk_full(module: str, name: str, where: str, call: int):
    mod = importlib.import_module(module)
    original, count = getattr(mod, name), [0]

    def writer(file, *args, **kwargs):
        count[0] += where in str(file)
        if where not in str(file) or count[0] != call:
            return original(file, *args, **kwargs)
        with open(file, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write() reports it: no file name

    setattr(mod, name, writer)
    return lambda: setattr(mod, name, original)


def slow(rank: int, module: str, name: str, seconds: float, call: int = 1):
    import time

    mod = importlib.import_module(module)
    original, calls = getattr(mod, name), [0]

    def held_once(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and int(os.environ.get("RANK", 0)) == rank:
            time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(mod, name, held_once)
    return lambda: setattr(mod, name, original)


def memory_ceiling(tokens: int, wrapped: bool = False):
    import torch

    from qwen3train.train import deepspeed_engine, engine

    originals = {cls: cls.forward for cls in (engine.TorchEngine, deepspeed_engine.DeepSpeedEngine)}

    def ceiling(original):
        def forward(self, **batch):
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
            n = int(sum(m.sum() for m in masks)) if masks else sum(r["input_ids"].numel() for r in batch["packed"])
            if torch.is_grad_enabled() and n > tokens:
                oom = torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated: {n} "
                                             f"tokens over a ceiling of {tokens})")
                if wrapped:  # as compiled code can report it: another error raised from CUDA's
                    raise RuntimeError("the compiled graph failed") from oom
                raise oom
            return original(self, **batch)
        return forward

    for cls, original in originals.items():
        cls.forward = ceiling(original)
    return lambda: [setattr(cls, "forward", original) for cls, original in originals.items()]


ATTEMPTS = {"ok": 0, "oom": 0}


def inference_ceiling(tokens: int):
    import torch

    from qwen3train.models.embedder import Embedder
    from qwen3train.models.reranker import Reranker

    def tokens_of(args, kwargs) -> int:
        if kwargs.get("packed") is not None:
            return sum(int(r["input_ids"].numel()) for r in kwargs["packed"])
        ids = kwargs.get("input_ids", args[0] if args else None)
        return int(ids.numel())

    def ceiling(original):
        def forward(self, *args, **kwargs):
            if not torch.is_grad_enabled():
                n = tokens_of(args, kwargs)
                ATTEMPTS["oom" if n > tokens else "ok"] += 1
                if n > tokens:
                    raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.00 GiB (simulated: {n} "
                                                 f"tokens in an inference forward over a ceiling of {tokens})")
            return original(self, *args, **kwargs)
        return forward

    originals = {(Embedder, "_pool_packed"): Embedder._pool_packed, (Embedder, "_pool"): Embedder._pool,
                 (Reranker, "forward"): Reranker.forward}
    for (cls, name), original in originals.items():
        setattr(cls, name, ceiling(original))
    return lambda: [setattr(cls, name, original) for (cls, name), original in originals.items()]


if __name__ == "__main__":
    for fault in filter(None, os.environ.get("QWEN3TRAIN_TEST_FAULT", "").split(";")):
        kind, _, arg = fault.partition(":")
        if kind == "nonfinite":
            nonfinite(int(s) for s in arg.split(","))
        elif kind == "memory_ceiling":
            memory_ceiling(int(arg))
        elif kind == "abort_at_exit":  # a native library's std::terminate in the interpreter's teardown
            import atexit

            atexit.register(os.abort)
        elif kind == "inference_ceiling":
            inference_ceiling(int(arg))
        elif kind == "cuda_memory_fraction":  # a real CUDA limit (bench/gpu_memory.py): the allocator's own error
            import torch

            torch.cuda.set_per_process_memory_fraction(float(arg))
        elif kind == "reshard_fails":  # DeepSpeed's converter missing: its process fails as a failed conversion does
            from qwen3train.train import reshard

            reshard.CONVERTER = "deepspeed.checkpoint.no_such_converter"
        elif kind == "slow":
            who, target, seconds, *call = arg.split(":")
            slow(int(who), *target.rsplit(".", 1), float(seconds), *map(int, call))
        elif kind == "disk_full":
            target, where, call = arg.split(":")
            disk_full(*target.rsplit(".", 1), where, int(call))
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    sys.argv[0] = "qwen3train"
    runpy.run_module("qwen3train.cli.main", run_name="__main__")
