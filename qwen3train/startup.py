"""What a process of ours does first, before it imports anything heavy.

transformers' generation package imports scikit-learn (and with it scipy, pandas and pyarrow) whenever it is
installed, for one thing: the adaptive confidence threshold of assisted generation (a draft model proposing
tokens), which no stage uses. That import costs every process that loads a model 1.0-1.6 s of CPU on 2 cores
(`python -X importtime`, 2026-12-07), about a sixth of its start, and a run starts a process per stage and per
rank. ``lean_transformers`` makes transformers' generation code (and whatever else takes ``is_sklearn_available``
from ``transformers.utils`` after it: the legacy GLUE metrics) see scikit-learn as absent; scikit-learn itself stays
importable (sentence-transformers' evaluators import it as they always did). Likewise its object-detection losses
(``transformers.loss``, imported with every model class, for the DETR family's Hungarian matching) import
``scipy.optimize``: 0.35-0.4 s more (2026-12-08); those modules alone see scipy as absent while they are imported.

Python's cycle collector took a quarter of a stage's start (1.57 of 6.24 s for the filter stage of the smoke pipeline,
measured with ``gc.callbacks``, 2026-12-07): imports and a model's load create hundreds of thousands of objects, and
every full collection walks all of them again (ten of them, 0.02 s growing to 0.25 s). The entry point runs its
imports with the collector off and then freezes what they made (module-level objects live as long as the process);
``gc_paused`` keeps it off while a checkpoint or tokenizer loads (the 151k-entry vocabulary, parsed in Python by
transformers 5, is mostly acyclic: reference counts free its temporaries)."""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import sys


def _absent() -> bool:
    return False


SCIPY_FOR_DETECTION = "transformers.loss."  # (the package's modules: DETR-family losses import scipy.optimize)


class _SklearnHidden(importlib.abc.MetaPathFinder):
    """Just before ``transformers.generation`` is imported, the ``is_sklearn_available`` it takes from
    ``transformers.utils`` says False; a module of ``SCIPY_FOR_DETECTION`` is found by the usual path finder and
    executed with ``is_scipy_available`` saying False, put back right after. Every other import goes on to the
    usual finders."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers.generation" and not name.startswith(SCIPY_FOR_DETECTION):
            return None
        utils = sys.modules.get("transformers.utils")
        if name == "transformers.generation":
            if not self.done:
                self.done = True  # (not removed from sys.meta_path: the import system is iterating over it)
                if hasattr(utils, "is_sklearn_available"):
                    utils.is_sklearn_available = _absent
            return None
        if not hasattr(utils, "is_scipy_available"):
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutScipy(spec.loader)
        return spec


class _WithoutScipy(importlib.abc.Loader):
    """A module's own loader, its code run while ``transformers.utils.is_scipy_available`` says False."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        utils = sys.modules["transformers.utils"]
        real, utils.is_scipy_available = utils.is_scipy_available, _absent
        try:
            self.inner.exec_module(module)
        finally:
            utils.is_scipy_available = real


def lean_transformers() -> bool:
    """Install the hook above; False (and nothing done) where transformers' generation code is already
    imported, as in a process that loaded a model before calling this."""
    if "transformers.generation" in sys.modules:
        return False
    if not any(isinstance(f, _SklearnHidden) for f in sys.meta_path):
        sys.meta_path.insert(0, _SklearnHidden())
    return True


@contextlib.contextmanager
def gc_paused():
    """The cycle collector off for the block (a load that allocates many objects and frees them by reference
    count), back on after it if it was on before; nothing is frozen, so a library user's garbage stays collectable."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def imports_done() -> None:
    """The entry point's imports are done: what they made moves to the collector's permanent generation (never
    walked again, never freed: module-level objects), and the collector runs from here on. No collection first:
    it walked ~290k objects for 0.17 s to free ~11k (7.4 MiB of the imports' reference cycles, frozen instead)."""
    gc.freeze()
    gc.enable()
