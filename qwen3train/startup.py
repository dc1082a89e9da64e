"""What a process of ours does first, before it imports anything heavy.

transformers' generation package imports scikit-learn (and with it scipy, pandas and pyarrow) whenever it is
installed, for one thing: the adaptive confidence threshold of assisted generation (a draft model proposing
tokens), which no stage uses. That import costs every process that loads a model 1.0-1.6 s of CPU on 2 cores
(`python -X importtime`, 2026-12-07), about a sixth of its start, and a run starts a process per stage and per
rank. ``lean_transformers`` makes transformers' generation code (and whatever else takes ``is_sklearn_available``
from ``transformers.utils`` after it: the legacy GLUE metrics) see scikit-learn as absent; scikit-learn itself stays
importable (sentence-transformers' evaluators import it as they always did).

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


class _SklearnHidden(importlib.abc.MetaPathFinder):
    """Just before ``transformers.generation`` is imported, the ``is_sklearn_available`` it takes from
    ``transformers.utils`` says False. Finds nothing itself: every import goes on to the usual finders."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if not self.done and name == "transformers.generation":
            self.done = True  # (not removed from sys.meta_path: the import system is iterating over it)
            utils = sys.modules.get("transformers.utils")
            if utils is not None and hasattr(utils, "is_sklearn_available"):
                utils.is_sklearn_available = _absent
        return None


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
