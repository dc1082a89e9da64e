"""Gradients that are not finite at chosen optimizer steps, for the tests of ``run.skip_nonfinite_steps``.

The loss of those steps is multiplied by NaN: the forward, the backward and the engine's step are the real
ones, so every gradient is NaN, as after an overflow or a batch that breaks the loss. Steps count from 1 in
each process. In-process: ``undo = inject({3})``; as a script (under torchrun too):
``NONFINITE_STEPS=2 python tests/train/nonfinite.py --config-name=stage2 key=value ...`` runs the CLI."""

from __future__ import annotations

import os
import runpy
import sys


def inject(steps):
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


if __name__ == "__main__":
    inject(int(s) for s in os.environ["NONFINITE_STEPS"].split(","))
    sys.argv[0] = "qwen3train"
    runpy.run_module("qwen3train.cli.main", run_name="__main__")
