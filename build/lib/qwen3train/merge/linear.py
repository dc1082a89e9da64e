"""Weighted average: ``sum_i w_i x_i`` with weights normalised to sum to 1 (for comparison)."""

from __future__ import annotations

import torch


def coefficients(g: torch.Tensor, weights: torch.Tensor, t: float) -> torch.Tensor:
    return weights / weights.sum()
