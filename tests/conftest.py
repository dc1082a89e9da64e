"""Shared fixtures: offline environment, the tiny Qwen3 built once per session, Hydra compose."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# record indexes of test data go to a folder of this session (subprocesses inherit it), not ~/.cache
os.environ.setdefault("QWEN3TRAIN_INDEX_DIR", tempfile.mkdtemp(prefix="qwen3train-index-"))

REPO = Path(__file__).resolve().parents[1]


def crash_report(proc, tail: int = 3000) -> str:
    """A failed subprocess's stderr for an assertion: the Python stacks of a process that died of a fatal signal
    first (``faulthandler``'s dump, which the entry point enables; a plain tail cuts it off), then the tail."""
    err = proc.stderr
    at = err.find("Fatal Python error")
    return (err[at:at + 8000] + "\n[...]\n" if at >= 0 else "") + err[-tail:]
SHARED = REPO.parent / "shared"  # optional (evaluation and benchmarks); tests read FIXTURES
FIXTURES = REPO / "tests" / "fixtures" / "collections"  # real cuts of ../shared/data (build_fixtures.py)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qwen3train.models.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from qwen3train.models.build import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def model_cfg(tiny_model_dir):
    from qwen3train.models.build import ModelConfig

    return ModelConfig(name="tiny", name_or_path=str(tiny_model_dir), max_query_length=64, max_doc_length=64)


@pytest.fixture()
def compose():
    """compose(config_name, overrides) -> the typed config object, as the CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from qwen3train.config import register_configs

    register_configs()

    def _compose(name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=overrides or [])
        return OmegaConf.to_object(cfg)

    return _compose


class _DiskWatch:
    """Samples the free space of the temporary folder's disk every half second and charges to each running test
    what was taken beyond what was taken when it started (with tests in parallel, ``make test``'s workers, a test
    is charged what its neighbours took meanwhile too). The terminal summary names the tests that took the most
    at their peak and the lowest free space, so a suite that fills a CI machine's disk says which test did it (a
    full disk once failed a CI run with 41 errors in setup, none of them the cause)."""

    def __init__(self, path: str):
        self.path, self.peak, self.running = path, {}, {}
        self.start = shutil.disk_usage(path).free
        self.low = (self.start, "(collection)")
        self.lock = threading.Lock()
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def begin(self, test: str):
        with self.lock:
            self.running[test] = shutil.disk_usage(self.path).free

    def end(self, test: str):
        with self.lock:
            self.running.pop(test, None)

    def _run(self):
        while not self.stop.wait(0.5):
            free = shutil.disk_usage(self.path).free
            with self.lock:
                for test, at_start in self.running.items():
                    if at_start - free > self.peak.get(test, 0):
                        self.peak[test] = at_start - free
                if free < self.low[0]:
                    self.low = (free, " + ".join(self.running) or "(between tests)")


_WATCH: _DiskWatch | None = None

# The files that take longest on 2 cores (``--durations`` of the CI simulations, each file's tests together),
# run first: pytest-xdist hands out whole files (``--dist loadfile``) in collection order, and a long file
# started last kept one worker busy while the other had nothing left to take.
LONGEST_FIRST = ("distributed/test_deepspeed.py", "models/test_families.py", "test_chaos.py", "test_gpu_check.py",
                 "mining/test_store.py", "distributed/test_gloo.py", "train/test_preempt.py", "eval/test_mteb.py")


def pytest_configure(config):
    # pytest-xdist (3.6+) sorts the files by their number of tests unless told not to, which put a long file
    # of one test (the chaos test) near the end of the queue and ignored the order below
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order, each file's tests stay together


def pytest_sessionstart(session):
    global _WATCH
    if not hasattr(session.config, "workerinput"):  # the controller of parallel workers, or a serial run
        _WATCH = _DiskWatch(tempfile.gettempdir())


def pytest_runtest_logstart(nodeid, location):
    if _WATCH is not None:
        _WATCH.begin(nodeid)


def pytest_runtest_logfinish(nodeid, location):
    if _WATCH is not None:
        _WATCH.end(nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    watch = _WATCH
    if watch is None:
        return
    watch.stop.set()
    gib = 1024 ** 3
    top = sorted(watch.peak.items(), key=lambda kv: -kv[1])[:8]
    terminalreporter.write_line(
        f"disk: {watch.start / gib:.1f} GiB free at the start, lowest {watch.low[0] / gib:.1f} GiB "
        f"(during {watch.low[1]}); most taken by one test at its peak (GiB, session fixtures it built included):")
    for test, used in top:
        terminalreporter.write_line(f"  {used / gib:6.2f}  {test}")
