"""A run stopped by its cluster: SIGTERM (a SLURM time limit or preemption, ``kill``, torchrun passing its own
on) finishes the step in progress, saves a checkpoint and stops; the same command resumes it exactly.

The save is collective, so every rank must stop after the same step, but the signal reaches the ranks at
different moments (or only some of them): each rank's flag rides in the loop's one per-step collective
(``dist.mean_floats``), and all of them stop at the first step boundary after any got it. The handler only
records the signal (printing from a handler can break a write in progress). Repeats change nothing: under
SLURM a rank gets the signal twice, from the job step and again from torchrun, and must still save (SIGKILL, or
SLURM's own after its grace time, ends a save that takes too long). Installed around the training loop only, and
only from the main thread."""

from __future__ import annotations

import contextlib
import signal
import threading


STOPPED = "stopped by "  # how the message of a run stopped with a checkpoint starts (errors.StoppedBySignal)
STATUS = 128 + signal.SIGTERM  # its exit status (cli.main), as of a process SIGTERM ended


class StopSignal:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals, self.signum, self._old = signals, 0, {}

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def name(signum: int) -> str:
    return signal.Signals(int(signum)).name


@contextlib.contextmanager
def forwarding(proc):
    """While ``proc`` runs (a stage of the pipeline, torchrun under ``cli.ranks``), SIGTERM to this process goes on
    to it: the ranks below finish their step, save and stop, and this process reads their status."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
