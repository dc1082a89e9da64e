"""N-way merge by a running spherical mean: sequential pairwise slerp.

    m_1 = x_1;   m_k = slerp(w_k / (w_1 + ... + w_k); m_{k-1}, x_k)

With equal weights t_k = 1/k, the spherical analogue of a running average. Every m_k is a linear
combination of the inputs, so the whole merge is computed in coefficient space from the Gram matrix.
"""

from __future__ import annotations

import torch

from qwen3train.merge.slerp import slerp_coefficients


def coefficients(g: torch.Tensor, weights: torch.Tensor, t: float) -> torch.Tensor:
    n = g.shape[0]
    c = torch.zeros(n, dtype=torch.float64)
    c[0] = 1.0
    total = float(weights[0])
    for k in range(1, n):
        total += float(weights[k])
        # Gram of (m_{k-1}, x_k) from the coefficients of m_{k-1}
        mm, mx, xx = c @ g @ c, c @ g[:, k], g[k, k]
        pair = torch.tensor([[mm, mx], [mx, xx]], dtype=torch.float64)
        ca, cb = slerp_coefficients(pair, float(weights[k]) / total)
        c = ca * c
        c[k] += cb
    return c
