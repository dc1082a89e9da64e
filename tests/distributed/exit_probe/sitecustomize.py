"""Imported at start-up by every Python process of a test that puts this folder first on PYTHONPATH (and sets
QWEN3TRAIN_EXIT_PROBE): at the very end of a rank's life, after every other exit handler (the first one
registered runs last), it writes the native threads still alive to ``$QWEN3TRAIN_EXIT_PROBE.rank<R>``, one
name a line. A process group held by anything past its destruction keeps its gloo threads (``gloo_tcp_loop``,
``pt_gloo_runloop``) and its store's into the interpreter's teardown, where a rank can abort after its work."""

import atexit
import os


def _record() -> None:
    prefix, rank = os.environ.get("QWEN3TRAIN_EXIT_PROBE"), os.environ.get("RANK")
    if not prefix or rank is None:  # not a rank (torchrun's own process), or not asked
        return
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended between the listing and the read: not alive at the end
            pass
    names.sort()
    with open(f"{prefix}.rank{rank}", "w") as f:
        f.write("\n".join(names) + "\n")


atexit.register(_record)
