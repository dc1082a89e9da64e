"""User errors: a mistake in a config, a file or a command line, reported as one line (exit 2).

``ConfigError`` is a ``ValueError`` so library callers can catch either; the command-line entry
point prints its message alone and exits with status 2 (``QWEN3TRAIN_DEBUG=1`` shows the traceback).
Bugs keep their tracebacks.
"""

import contextlib
import errno
import os
import shutil
import socket
import threading
from pathlib import Path


class ConfigError(ValueError):
    """A setting, or a file a setting names, that cannot be used as given."""


class TrainingDiverged(RuntimeError):
    """Training met non-finite losses or gradients it may not skip (``run.skip_nonfinite_steps``): a
    learning rate or temperature too extreme, or data that breaks the loss. The message names the last
    good checkpoint; the command line prints it as one line (status 2)."""


class DiskFull(ConfigError):
    """A write met a full disk or quota. One rank may meet it alone: that rank prints it, naming itself."""

    collective = False


class OutOfMemory(ConfigError):
    """A micro batch the device's memory cannot hold (``qwen3train.train.memory``): the message names the step,
    the micro batch and the setting that fits. One rank may meet it alone: that rank prints it."""

    collective = False


class SourceUnreachable(ConfigError):
    """A streamed data source that kept failing to read (its host, the network, a rate limit) after the retries
    (``data.stream_retries``); the last checkpoint is kept and the same command resumes. One rank may meet it
    alone: that rank prints it."""

    collective = False


def disk_full(e: BaseException) -> bool:
    """A full disk or quota, as the OS reports it (OSError) or as torch.save's zip writer does (RuntimeError)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(k in str(e) for k in ("No space left", "file write failed",
                                                                     "Disk quota exceeded"))


def at_least(section: str, **limits: tuple[float | None, float]) -> None:
    """Schema checks: ``at_least("mine", chunk_size=(cfg.chunk_size, 1))`` raises the one-line ValueError
    ``mine.chunk_size must be >= 1, got 0`` for the first setting below its floor (None: unset, not checked)."""
    for name, (value, low) in limits.items():
        if value is not None and value < low:
            raise ValueError(f"{section}.{name} must be >= {low:g}, got {value}")


def private_tmp(path, suffix: str = ".tmp") -> Path:
    """A hidden temporary name beside ``path`` that no other writer uses (host, process, thread). Two jobs may
    write one file at once (stage-0 array jobs that finish together both assemble the pairs; two evaluations
    fill one embedding cache): each writes its own temporary and the last rename wins, where a shared name let
    one writer rename the other's half-written file into place and then fail on its own rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}{suffix}")


@contextlib.contextmanager
def writing(path, tmp, kept: str = "everything finished before it is kept"):
    """``with writing(path, tmp):`` around the write of ``tmp`` (renamed to ``path`` when complete): when it
    fails, the partial ``tmp`` is removed (a file or a folder), and a full disk becomes one line naming
    ``path`` (``DiskFull``: status 2 from the command line); ``kept`` says what survives."""
    try:
        yield
    except BaseException as e:
        tmp = Path(tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise DiskFull(f"no space left on the device while writing {path}; the partial file was removed "
                           f"and {kept}: free space and rerun the same command to continue") from None
        raise


class StoppedBySignal(Exception):
    """A run that saved a checkpoint and stopped on a signal (its cluster's time limit or preemption, a
    ``kill``): not a failure; the same command resumes it. The command line prints the message once and exits
    with 128 + the signal's number, the status of a process the signal ended."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
