"""Run torchrun so that a user's mistake on any rank ends the whole run as one line and status 2.

    python -m qwen3train.cli.ranks <torchrun arguments> -m qwen3train.cli.main ...   (scripts/launch.sh)

The ranks print their own errors (``qwen3train.cli.main``: one ``error:`` line, status 2, printed once
for an error every rank shares; a rank whose peers vanished says so in one ``note`` line). torchrun then
stops the other ranks and adds its own report: a ``ChildFailedError`` traceback and a table of failures.
When the failed ranks exited with status 2 (a user's mistake, already reported) or were stopped by
torchrun after it (SIGTERM), that report is dropped and this wrapper exits 2; when they saved a checkpoint and
stopped on SIGTERM (forwarded by this wrapper to torchrun, which passes it on), it is dropped too and the wrapper
exits 143; otherwise (a bug, a crash, a kill) it is passed through unchanged with torchrun's status. Everything
else is passed through as it comes.
"""

from __future__ import annotations

import re
import subprocess
import sys

from qwen3train.net import free_port
from qwen3train.train import preempt

_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
_SIGNALLED = "torch.distributed.elastic.multiprocessing.api.SignalException"  # torchrun itself got a signal
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
# torchrun's log lines about its workers (failure notices, the SIGTERM it sends to the others)
_AGENT_LINE = re.compile(r"torch/distributed/elastic/|Sending process \d+ closing signal|failed \(exitcode: "
                         r"|^--- Logging error ---")  # the last: torchrun signalled again while it logged the first


def filter_stream(lines, out) -> tuple[list[str], list[int]]:
    """Pass ``lines`` to ``out`` except torchrun's own report and its log lines about the workers;
    returns (what was held back, the exit codes of the failed ranks)."""
    held: list[str] = []  # torchrun's log lines, and its report once it starts
    block: list[str] = []  # a traceback not yet known to be torchrun's
    in_report = False
    codes: list[int] = []
    for line in lines:
        if line.startswith(preempt.STOPPED):  # a rank saved a checkpoint and stopped: said wherever it falls, even
            out.write(line)  # inside torchrun's report (its second SIGTERM can start one before the ranks are done)
            out.flush()
            continue
        if in_report:
            held.append(line)
            codes += [int(c) for c in _EXITCODE.findall(line)]
        elif block:  # inside a traceback: it ends at the first line that is not indented
            block.append(line)
            if line.startswith((" ", "\t", "Traceback")) or not line.strip():  # a frame's source may hold a
                continue  # blank line (torchrun interrupted by SIGTERM inside enum's multi-line signature)
            if line.startswith((_CHILD_FAILED, _SIGNALLED)):
                held += block
                in_report = True
            else:
                out.write("".join(block))  # a rank's own traceback (a bug): shown as it is
                out.flush()
            block = []
        elif line.startswith("Traceback (most recent call last):"):
            block = [line]
        elif _AGENT_LINE.search(line):
            held.append(line)
        else:
            out.write(line)
            out.flush()
    return held + block, codes


FIXED_PORT = "29511"  # the rendezvous port of a multi-node run whose MASTER_PORT is not set (the same on every node)


def resolve_port(argv: list[str]) -> list[str]:
    """``--master_port auto`` (the default of scripts/launch.sh, the Makefile and the pipeline): on one node a
    free port, so that two runs on one machine (two experiments on halves of a GPU node, a test suite run in
    parallel) do not meet on the same rendezvous; on several nodes the fixed 29511, which every node must agree
    on without talking (SLURM jobs set MASTER_PORT from the job id: qwen3train.cli.slurm)."""
    out = list(argv)
    if "--master_port" not in out or out[out.index("--master_port") + 1] != "auto":
        return out
    at = out.index("--master_port") + 1
    nnodes = out[out.index("--nnodes") + 1] if "--nnodes" in out else "1"
    out[at] = str(free_port()) if nnodes == "1" else FIXED_PORT
    return out


class _Watch:
    """The stream the ranks' lines go to, noting whether rank 0 said it stopped with a checkpoint."""

    def __init__(self, out) -> None:
        self.out, self.stopped = out, False

    def write(self, text: str) -> int:
        self.stopped |= text.startswith(preempt.STOPPED)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def main(argv: list[str]) -> int:
    argv = resolve_port(argv)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    watch = _Watch(sys.stderr)
    # SIGTERM to this wrapper (a cluster's time limit, a kill) goes on to torchrun, which passes it to the ranks:
    # they finish the step, save a checkpoint and stop
    with preempt.forwarding(proc):
        held, codes = filter_stream(proc.stderr, watch)
        rc = proc.wait()
    # a rank's user error is 2; torchrun then stops the others with SIGTERM (-15), or SIGKILL (-9) after its grace
    # time where one waits in a collective for the rank that left (training takes SIGTERM at its next step): nothing
    # to add
    if rc != 0 and 2 in codes and all(c in (2, -15, -9) for c in codes):
        return 2
    # stopped on SIGTERM after saving a checkpoint (rank 0 said so): torchrun's report of the signal adds nothing
    if rc != 0 and watch.stopped and all(c in (preempt.STATUS, -15) for c in codes):
        return preempt.STATUS
    sys.stderr.write("".join(held))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
