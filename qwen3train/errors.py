"""User errors: a mistake in a config, a file or a command line, reported as one line (exit 2).

``ConfigError`` is a ``ValueError`` so library callers can catch either; the command-line entry
point prints its message alone and exits with status 2 (``QWEN3TRAIN_DEBUG=1`` shows the traceback).
Bugs keep their tracebacks.
"""


class ConfigError(ValueError):
    """A setting, or a file a setting names, that cannot be used as given."""


class TrainingDiverged(RuntimeError):
    """Training met non-finite losses or gradients it may not skip (``run.skip_nonfinite_steps``): a
    learning rate or temperature too extreme, or data that breaks the loss. The message names the last
    good checkpoint; the command line prints it as one line (status 2)."""
