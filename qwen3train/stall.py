"""A job that stops moving says where each rank stands (``run.stall_report_s``, ``mine.stall_report_s``,
``filter.stall_report_s``, ``synth.stall_report_s``, ``eval.stall_report_s``).

A multi-GPU job can stop making progress without failing: one rank blocked reading a file on a network
filesystem while the others wait for it in a collective, a data thread that never returns, a GPU kernel that
never ends. The process group's timeout ends such a run after 30 minutes (mining's ranks wait 12 hours for each
other's shards) with a message about the collective that timed out, not about where each rank was; finding out
took ``py-spy`` on every node while it hung.

Here a thread of each rank watches the job's progress: a phase finishing (a training step, a checkpoint save, a
dev evaluation, the memory rehearsal; mining's and the filter's stages), and every update of a progress bar
inside a phase (``qwen3train.progress``: texts encoded, queries searched, pairs scored; stage 0's generations
finished, from the backends), which re-arms the watch without changing the phase (``beat``). Stage 0's jobs
share no collective, but a generation can hang inside vLLM (its engine or tensor-parallel workers): the report
names the shard, the step and the attempt it was in. When nothing has moved for the configured seconds (default 900: before
the collectives' 30-minute timeout), the rank prints one line naming itself and the phase it is in, then the
Python stack of every one of its threads, named (a thread stuck in native code, a collective or a read, has let
go of the interpreter's lock, so the watcher runs). Once per stall: progress re-arms it. Nothing is stopped: a
slow phase that recovers (a checkpoint written to a slow disk) just goes on.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback


_watching: StallReport | None = None  # the process's watcher, which progress bars re-arm (``beat``)


def beat() -> None:
    """Progress inside the current phase (a progress bar moved): re-arms the watcher, keeps its phase."""
    watch = _watching
    if watch is not None:
        watch._since, watch._reported = time.monotonic(), False


def enter(what: str) -> None:
    """The job enters ``what`` (``StallReport.phase`` of the process's watcher; nothing without one)."""
    watch = _watching
    if watch is not None:
        watch.phase(what)


class StallReport:
    """``StallReport(seconds, rank, setting, idle)``: ``rank`` a rank's number or a name for the process (stage
    0's ``synth job 3 of 8``), ``setting`` names the config key in the report, ``idle`` says what has not happened
    (``no step, save or evaluation finished``)."""

    def __init__(self, seconds: float, rank: int | str, setting: str = "run.stall_report_s",
                 idle: str = "no step, save or evaluation finished") -> None:
        global _watching
        self.seconds, self.rank, self.setting, self.idle = seconds, rank, setting, idle
        self.fired = 0  # how many stalls were reported (tests)
        self._phase, self._since, self._reported = "the setup", time.monotonic(), False
        self._stop = threading.Event()
        self._thread = None
        if seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="qwen3train-stall", daemon=True)
            self._thread.start()
            _watching = self

    def phase(self, what: str) -> None:
        """Progress: the job enters ``what`` (one assignment: nothing a step would notice)."""
        self._phase, self._since, self._reported = what, time.monotonic(), False

    def _watch(self) -> None:
        poll = min(max(self.seconds / 4, 0.05), 30.0)
        while not self._stop.wait(poll):
            phase, since = self._phase, self._since
            waited = time.monotonic() - since
            if waited >= self.seconds and not self._reported and since == self._since:
                self._reported = True
                self.fired += 1
                # on a line of its own: a progress bar may hold the current one
                who = f"rank {self.rank}" if isinstance(self.rank, int) else self.rank
                print(f"\nstall: {who} in {phase}: {self.idle} for {waited:.0f} s "
                      f"({self.setting}={self.seconds:g}); nothing is stopped. The Python stacks of its "
                      f"threads:\n{stacks()}", file=sys.stderr, flush=True)

    def __enter__(self) -> StallReport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        global _watching
        if _watching is self:
            _watching = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def stacks() -> str:
    """Every thread's Python stack but the watcher's, most recent call last, under its thread's name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    parts = [f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
             for ident, frame in sys._current_frames().items() if ident != me]
    return "\n".join(parts).rstrip()
