"""Runs ``python -m qwen3train.cli.main ARGS`` as a forked child of a process that has already imported what the
entry point imports at its top (torch, Hydra, the config schema): each child is a process of its own (pid, exit
status, stdout and stderr, exit handlers) and runs the module as ``__main__`` exactly as ``python -m`` does, less the
~2 s of imports every fresh interpreter pays on 2 cores. For the tests of user mistakes (tests/test_cli_errors.py):
~50 commands that stop before any model loads, where those imports were most of each test's time.

What a child does not share with a fresh interpreter: modules imported here run their import-time code once, in this
process, with this process's environment (the pytest worker's; a variable a test sets for its command reaches
``os.environ`` of the child, not those modules' import-time reads); ``PYTHONWARNINGS`` is applied by hand. Start-up
itself (what is imported, in which order) is tested by fresh processes elsewhere (tests/test_startup.py).

Protocol: one JSON request per line on stdin ({"argv", "cwd", "env", "stdout", "stderr"}), one reply per line on
stdout ({"rc"}: the exit status, or -N for a child killed by signal N, as ``subprocess`` reports it)."""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

MODULE = "qwen3train.cli.main"


def preload() -> None:
    import hydra  # noqa: F401
    import omegaconf  # noqa: F401
    import torch  # noqa: F401

    import qwen3train.config  # noqa: F401
    import qwen3train.startup  # noqa: F401

    # the entry point hides scikit-learn from transformers' generation code before it is imported: a child must
    # find it not imported yet, as a fresh process does
    assert "transformers.generation" not in sys.modules, "the preload imported transformers' generation code"


def threads() -> int:
    """The OS threads of this process (a fork copies only the calling one: there must be no other)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def child(req: dict, reply_fd: int) -> None:
    """In the forked child: become the command's process, run the module as ``__main__``, exit with its status."""
    code = 0
    try:
        os.close(reply_fd)
        os.chdir(req["cwd"])
        sys.path[0] = os.getcwd()  # what `python -m` puts first (here: this file's folder)
        os.environ.clear()
        os.environ.update(req["env"])
        for option in filter(None, os.environ.get("PYTHONWARNINGS", "").split(",")):
            warnings._setoption(option)  # what the interpreter does with PYTHONWARNINGS at its start
        fd_in = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd_in, 0)
        os.close(fd_in)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        sys.argv = [MODULE.replace(".", "/") + ".py", *req["argv"]]
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # sys.exit(n), as the interpreter turns it into a status
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: its traceback and status 1, as the interpreter does
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w")  # replies on a descriptor of their own; stray prints go to stderr
    os.dup2(2, 1)
    preload()
    gc.freeze()  # what the preload made, as a fresh entry point freezes its imports (qwen3train/startup.py): a
    # child's own full collection then walks only what the child makes
    if threads() != 1:
        print(json.dumps({"error": f"{threads()} threads after the imports: a fork would lose them"}), file=reply,
              flush=True)
        return
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req, reply.fileno())
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc}), file=reply, flush=True)


class Zygote:
    """The test side: ``run`` takes what ``subprocess.run([python, -m, MODULE, *argv], capture_output=True,
    text=True)`` takes and returns what it returns."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="zygote-")
        # one thread to fork from: torch's import starts its OpenMP pool's thread unless OMP_NUM_THREADS=1 (as
        # `make test` sets it; a bare `pytest` need not)
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        first = self._reply(300)
        assert first.get("ready"), first

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise subprocess.TimeoutExpired(MODULE, timeout)
        line = self.proc.stdout.readline()
        assert line, f"the zygote ended (status {self.proc.poll()})"
        return json.loads(line)

    def run(self, argv: list[str], cwd, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
        out, err = Path(self.tmp.name) / "stdout", Path(self.tmp.name) / "stderr"
        req = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env), "stdout": str(out),
               "stderr": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        rc = self._reply(timeout)["rc"]
        return subprocess.CompletedProcess([sys.executable, "-m", MODULE, *argv], rc,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and a child still running
            self.proc.wait()
        self.tmp.cleanup()


if __name__ == "__main__":
    serve()
