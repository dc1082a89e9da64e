"""Merge methods, one per file, listed in one dict.

Each entry maps the inputs' Gram matrix (float64, ``[n, n]``), the per-input weights and ``t`` to the
coefficients of the output as a linear combination of the inputs (see ``gram.py``).
"""

from __future__ import annotations

from qwen3train.merge import linear, multislerp, running_slerp, slerp
from qwen3train.errors import ConfigError

METHODS = {
    "slerp": slerp.coefficients,
    "running_slerp": running_slerp.coefficients,
    "multislerp": multislerp.coefficients,
    "linear": linear.coefficients,
}


def get_method(name: str):
    if name not in METHODS:
        raise ConfigError(f"unknown merge method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
