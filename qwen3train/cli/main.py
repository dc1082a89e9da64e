"""The one command-line entry point: Hydra composes the primary config (one per make target), the
typed object is converted once, and its schema type picks what runs.

    qwen3train stage1 engine.global_batch_size=64          (the console command of an installed package)
    python -m qwen3train.cli.main --config-name=stage1 engine.global_batch_size=64
    torchrun --nproc_per_node 8 -m qwen3train.cli.main --config-name=stage2 engine=zero3

Configs are found through Hydra's ``pkg://qwen3train.configs`` (the repository's ``configs/``, shipped in
the wheel); ``--config-dir=my_configs`` adds a folder of your own (read after ours: give its files names of
their own; a command's config named like one of ours is refused, since Hydra would run ours).
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a process starting: its imports run without the cycle collector (startup.py)
    gc.disable()

import os
import re
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from qwen3train.cli.check import _config_path, _multi_rank, precheck, report
from qwen3train.config import register_configs, runner_for
from qwen3train.startup import imports_done, lean_transformers

register_configs()


def multirun_job_dir() -> str | None:
    """Under ``-m`` (Hydra multirun): ``<job number>_<the swept settings of this job>`` (e.g.
    ``1_optim.lr=0.002``), the folder this job writes into below the configured output folder, so that
    jobs of one sweep never share (and resume) a run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    swept = set()  # keys given several values on the command line (a,b / range(...) / choice(...) / glob(...))
    for a in sys.argv[1:]:
        key, _, value = a.partition("=")
        if value and not a.startswith("-") and ("," in value or value.startswith(("range(", "choice(", "glob("))):
            swept.add(key.lstrip("+~"))
    parts = [o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in swept] or [hc.job.override_dirname]
    name = re.sub(r"[^A-Za-z0-9._=,-]+", "_", ",".join(p for p in parts if p) or "job")[:80]
    return f"{hc.job.num}_{name}"


def place_job(cfg, job: str) -> None:
    """Move every output location of a typed config one folder down, into ``job``."""
    run = getattr(cfg, "run", None)
    if run is not None and hasattr(run, "output_dir"):
        run.output_dir = os.path.join(run.output_dir, job)
    if isinstance(getattr(cfg, "output_dir", None), str):
        cfg.output_dir = os.path.join(cfg.output_dir, job)
    if isinstance(getattr(cfg, "output", None), str):  # a file (mining): same name, in the job's folder
        cfg.output = os.path.join(os.path.dirname(cfg.output), job, os.path.basename(cfg.output))


def user_error(e: BaseException) -> str | None:
    """The one-line message of a user's mistake, or None for a bug (which keeps its traceback)."""
    from qwen3train.data.records import DataError
    from qwen3train.errors import ConfigError, TrainingDiverged, disk_full
    from qwen3train.merge.io import MergeError

    if isinstance(e, (ConfigError, DataError, MergeError, TrainingDiverged)):
        return str(e)
    if disk_full(e):  # a writer without its own message (those name their file: errors.writing)
        return (f"no space left on the device ({e}); finished stages, shards, chunks and checkpoints are kept: "
                f"free space and rerun the same command to continue")
    if isinstance(e, FileNotFoundError):
        return f"no such file or folder: {e.filename}" if e.filename else str(e)
    return None


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
             "DistNetworkError", "recvBytes", "Socket Timeout")


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank is gone (it stopped on its own error, or was killed)."""
    text = f"{type(e).__name__}: {e}"  # torch.distributed's DistError and its kin are RuntimeErrors
    return _multi_rank() and isinstance(e, RuntimeError) and any(k in text for k in PEER_LOST)


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="stage1")
def main(dict_cfg: DictConfig) -> None:
    debug = os.environ.get("QWEN3TRAIN_DEBUG") == "1"
    try:
        cfg = OmegaConf.to_object(dict_cfg)  # the schemas' __post_init__ checks run here
    except Exception as e:  # noqa: BLE001 - a value the schema refuses is the user's mistake
        if debug:
            raise
        report(str(e).strip().splitlines()[0])
    job = multirun_job_dir()
    if job:
        place_job(cfg, job)
    try:
        runner_for(cfg)(cfg)
    except Exception as e:  # a user's mistake: one line, status 2; tracebacks are for bugs
        from qwen3train.errors import StoppedBySignal, disk_full

        if isinstance(e, StoppedBySignal):  # a checkpoint saved on SIGTERM: said once, the signal's status
            if os.environ.get("RANK", "0") == "0":
                print(str(e), file=sys.stderr, flush=True)
            sys.exit(128 + e.signum)
        msg = user_error(e)
        if msg is None and peer_lost(e) and not debug:  # another rank stopped first: it said why
            print(f"note (rank {os.environ.get('RANK')}): stopped: another rank ended the run "
                  f"({str(e).strip().splitlines()[0][:120]})", file=sys.stderr, flush=True)
            sys.exit(2)
        if msg is None or debug:
            raise
        from qwen3train.data.records import DataError

        # a bad record or a full disk one rank meets alone is printed by that rank (``collective`` False)
        report(msg, collective=getattr(e, "collective", not isinstance(e, DataError) and not disk_full(e)))


ALIASES = {"mteb": {"model": "export"}}  # command -> {key users type: the config's key}


def _depth(text: str) -> int:
    """Brackets ``[`` / ``{`` opened and not closed in an argument, outside quoted strings."""
    depth, quote = 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def rejoin(argv: list[str]) -> list[str]:
    """An override that a shell split at its spaces, put back together: ``make prepare ARGS="sources=[{path:
    a.jsonl, count: 10}]"`` reaches us as ``sources=[{path:``, ``a.jsonl,``, ``count:``, ``10}]`` (the
    Makefile passes ARGS unquoted, to split the overrides). Pieces are joined with one space while brackets
    stay open, which Hydra's grammar reads alike; an argument whose brackets never close is left as it was."""
    out, i = [], 0
    while i < len(argv):
        j, joined = i, argv[i]
        while _depth(joined) > 0 and j + 1 < len(argv):
            j += 1
            joined += " " + argv[j]
        if _depth(joined) == 0 and j > i:
            out.append(joined)
            i = j + 1
        else:
            out.append(argv[i])
            i += 1
    return out


def apply_aliases(argv: list[str]) -> list[str]:
    """``make mteb ARGS="model=<export>"``: ``model`` is a config group of the training commands, so the
    MTEB command's model folder is the key ``export``; the spelling users expect is accepted for it. First,
    an override split at its spaces is put back together (``rejoin``)."""
    argv = rejoin(argv)
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config-name=")), None)
    alias = ALIASES.get(name or "", {})
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        out.append(f"{alias[key]}={value}" if eq and key in alias else a)
    return out


def crash_stacks() -> None:
    """A process that dies of a fatal signal (a segfault; SIGABRT from a native library's ``std::terminate``,
    as a rank's teardown has rarely met under load) prints every thread's Python stack first: under
    torchrun such a rank otherwise shows only the signal's name."""
    import faulthandler

    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def _commands() -> list[str]:
    path = _config_path()
    if path.startswith("pkg://"):
        from importlib.resources import files

        folder = files(path[len("pkg://"):])
    else:
        from pathlib import Path

        folder = Path(__file__).resolve().parent / path
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))


def cli() -> None:
    """``qwen3train <command> [overrides]``: a command is a primary config's name (stage1, pipeline, ...)."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: qwen3train <command> [key=value ...] [--config-dir=DIR] [-m]\n"
              f"commands: {', '.join(_commands())} (or the name of a config in --config-dir)\n"
              "example: qwen3train stage1 model=qwen3-0.6b engine=zero2 optim.lr=2e-5")
        sys.exit(0 if args else 2)
    at = _command_at(args)
    if at:  # flags before the command (`qwen3train --config-dir=my mine ...`, `-m`): the command moved first
        args = [args[at], *args[:at], *args[at + 1:]]
        sys.argv = [sys.argv[0], *args]
    if args[0].startswith("-"):  # Hydra's own spelling first (--config-name=stage1 ...), as `python -m` takes it
        sys.argv = apply_aliases(sys.argv)
    elif "=" in args[0]:  # an override where the command belongs
        print(f"error: the first argument is the command ({', '.join(_commands())}), got {args[0]!r}: "
              f"qwen3train stage1 {' '.join(args)}", file=sys.stderr)
        sys.exit(2)
    else:
        sys.argv = apply_aliases([sys.argv[0], f"--config-name={args[0]}", *args[1:]])
    start()


def _command_at(args: list[str]) -> int:
    """Where the command is when flags come first (``--config-dir=DIR``, ``--config-dir DIR``, ``-cd DIR``, ``-m``):
    the first argument that is neither a flag, a flag's folder nor an override; 0 where it is first or absent
    (Hydra's spelling, ``--config-name=...``, names none)."""
    i = 0
    while i < len(args) and args[i] in ("--config-dir", "-cd", "-m", "--multirun") or \
            (i < len(args) and args[i].startswith("--config-dir=")):
        i += 2 if args[i] in ("--config-dir", "-cd") else 1
    if 0 < i < len(args) and not args[i].startswith("-") and "=" not in args[i] and \
            not any(a.startswith("--config-name") for a in args):
        return i
    return 0


def start() -> None:
    """Both spellings of the entry point, once their command line is in Hydra's form: the overrides checked, the
    process set up (the cycle collector on, the imports' objects frozen; fatal signals' stacks; transformers without
    scikit-learn), then the command."""
    imports_done()
    sys.argv[1:] = precheck(sys.argv[1:])
    crash_stacks()
    lean_transformers()
    main()


if __name__ == "__main__":
    sys.argv = apply_aliases(sys.argv)
    start()
