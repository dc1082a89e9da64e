"""The shared core of every merge method: the Gram matrix of the inputs and linear combination.

Each method's output is a linear combination ``sum_i c_i x_i`` of its inputs whose coefficients
depend only on the Gram matrix ``G_ij = <x_i, x_j>`` (angles and norms). So a merge needs two
chunked passes over a tensor, never more than one fp32 chunk per input alive: the Gram pass
(float64 accumulation) and the combination pass. The in-memory reference and the streaming
application call these same functions, so their outputs are bit-identical.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # elements per chunk (16 MiB of fp32 per input)


def gram(xs: list[torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    """``[n, n]`` float64 Gram matrix of the flattened tensors, accumulated chunk by chunk."""
    flat = [x.reshape(-1) for x in xs]
    n, size = len(flat), flat[0].numel()
    g = torch.zeros((n, n), dtype=torch.float64)
    for s in range(0, size, chunk):
        block = torch.stack([f[s:s + chunk].double() for f in flat])  # [n, chunk]
        g += block @ block.T
    return g


def combine_chunks(xs: list[torch.Tensor], coeffs: torch.Tensor, dtype: torch.dtype, chunk: int = CHUNK):
    """Yield ``sum_i c_i x_i`` chunk by chunk (fp32 arithmetic, cast to ``dtype``)."""
    flat = [x.reshape(-1) for x in xs]
    c = [float(v) for v in coeffs]
    for s in range(0, flat[0].numel(), chunk):
        acc = flat[0][s:s + chunk].to(torch.float32, copy=True).mul_(c[0])  # never scale the input itself
        for ci, f in zip(c[1:], flat[1:]):
            acc.add_(f[s:s + chunk].float(), alpha=ci)
        yield acc.to(dtype)


def combine(xs: list[torch.Tensor], coeffs: torch.Tensor, dtype: torch.dtype | None = None,
            chunk: int = CHUNK) -> torch.Tensor:
    dtype = dtype or xs[0].dtype
    return torch.cat(list(combine_chunks(xs, coeffs, dtype, chunk))).view(xs[0].shape)
