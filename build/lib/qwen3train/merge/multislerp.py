"""N-way spherical merge: the weighted Karcher (Frechet) mean of the directions, scaled by the
weighted mean of the norms.

    u_i = x_i / |x_i|;   m = argmin_{|m|=1} sum_i w_i arccos(<m, u_i>)^2   (Riemannian gradient
    iterations: m <- exp_m(sum_i w_i log_m(u_i)));   result = (sum_i w_i |x_i|) m

The mean lies in the span of the inputs, so it is computed on coefficients from the Gram matrix.
Identical inputs return the input; two inputs with equal weights give slerp(0.5). A zero input
makes the tensor fall back to the weighted linear average.
"""

from __future__ import annotations

import math

import torch


def coefficients(g: torch.Tensor, weights: torch.Tensor, t: float, iters: int = 50,
                 tol: float = 1e-12) -> torch.Tensor:
    w = weights / weights.sum()
    norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    if bool((norms == 0).any()):
        return w.clone()
    u = g / (norms[:, None] * norms[None, :])  # Gram of the unit directions
    m = w.clone()  # coefficients of m over the u_i
    m = m / math.sqrt(float(m @ u @ m))
    for _ in range(iters):
        dots = torch.clamp(u @ m, -1.0, 1.0)  # <u_i, m>
        step = torch.zeros_like(m)
        for i in range(len(w)):
            theta = math.acos(float(dots[i]))
            if theta < 1e-12:
                continue
            scale = float(w[i]) * theta / math.sin(theta)
            step -= scale * float(dots[i]) * m  # log_m(u_i) = theta/sin(theta) (u_i - cos(theta) m)
            step[i] += scale
        size = math.sqrt(max(float(step @ u @ step), 0.0))
        if size < tol:
            break
        m = math.cos(size) * m + math.sin(size) * step / size
        m = m / math.sqrt(float(m @ u @ m))
    return float(w @ norms) * m / norms
