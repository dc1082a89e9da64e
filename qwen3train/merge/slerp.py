"""Spherical linear interpolation of two tensors (per tensor, angle from the flattened tensors).

    Omega = arccos(<a, b> / (|a| |b|))
    slerp(t; a, b) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b

Falls back to linear interpolation ``(1 - t) a + t b`` when the tensors are nearly colinear
(``sin(Omega) < eps``: Omega ~ 0 or ~ pi) or either is all zeros. For inputs of equal norm the result
keeps that norm for every t; slerp(0) = a, slerp(1) = b, and slerp(t; a, b) = slerp(1 - t; b, a).
"""

from __future__ import annotations

import math

import torch

from qwen3train.merge.gram import combine, gram
from qwen3train.errors import ConfigError

EPS = 1e-6


def slerp_coefficients(g: torch.Tensor, t: float, eps: float = EPS) -> torch.Tensor:
    """Coefficients (c_a, c_b) from the 2 x 2 Gram matrix."""
    na, nb = math.sqrt(max(g[0, 0].item(), 0.0)), math.sqrt(max(g[1, 1].item(), 0.0))
    if na == 0.0 or nb == 0.0:
        return torch.tensor([1.0 - t, t], dtype=torch.float64)
    cos = max(-1.0, min(1.0, g[0, 1].item() / (na * nb)))
    omega = math.acos(cos)
    so = math.sin(omega)
    if so < eps:
        return torch.tensor([1.0 - t, t], dtype=torch.float64)
    return torch.tensor([math.sin((1.0 - t) * omega) / so, math.sin(t * omega) / so], dtype=torch.float64)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Slerp two tensors of the same shape; the result has ``a``'s dtype."""
    return combine([a, b], slerp_coefficients(gram([a, b]), t, eps))


def coefficients(g: torch.Tensor, weights: torch.Tensor, t: float) -> torch.Tensor:
    """Registry entry: exactly two inputs, interpolation parameter ``t``."""
    if g.shape[0] != 2:
        raise ConfigError(f"slerp merges exactly 2 inputs, got {g.shape[0]}; use running_slerp or multislerp")
    return slerp_coefficients(g, t)
