"""The shared core of every merge method: the Gram matrix of the inputs and linear combination.

Each method's output is a linear combination ``sum_i c_i x_i`` of its inputs whose coefficients
depend only on the Gram matrix ``G_ij = <x_i, x_j>`` (angles and norms). So a merge needs two
passes over a tensor: the Gram pass and the combination pass. Both walk the flattened tensors in
blocks of ``BLOCK`` elements (1 MiB of fp32 per input), converting each input's block to fp32 into
a buffer that stays in the CPU cache, so the arithmetic costs little beside reading the inputs.
The in-memory reference and the streaming application call these same functions, so their outputs
are bit-identical.

Accuracy of the angle. Checkpoints of one run are nearly parallel, and ``1 - cos`` is then tiny;
computing ``<x_i, x_j>`` directly would lose it to rounding. The Gram pass therefore works in the
frame of the first input: per block, in fp32, ``n = <x_0, x_0>``, ``c_i = <x_0, d_i>`` and
``D_ij = <d_i, d_j>`` with ``d_i = x_i - x_0`` (exact for bf16 inputs), summed over blocks in
float64, and ``G_ij = n + c_i + c_j + D_ij`` is assembled in float64. Then
``G_00 + G_11 - 2 G_01 = D_11`` holds to float64 rounding of ``n``, so ``1 - cos`` keeps fp32
relative accuracy however close the inputs are.
"""

from __future__ import annotations

import torch

BLOCK = 1 << 18  # elements per block
CHUNK = 1 << 22  # elements per output chunk handed to the writer (8 MiB of bf16)


def gram(xs: list[torch.Tensor], block: int = BLOCK) -> torch.Tensor:
    """``[n, n]`` float64 Gram matrix of the flattened tensors (see the module docstring)."""
    flat = [x.reshape(-1) for x in xs]
    n, size = len(flat), flat[0].numel()
    buf = torch.empty((n, max(1, min(block, size))), dtype=torch.float32)
    acc = torch.zeros((n, n), dtype=torch.float64)
    few = [[0.0] * n for _ in range(n)]  # float64 sums of the fp32 block dots (n <= 4)
    for s in range(0, size, block):
        b = buf[:, : min(block, size - s)]
        b[0].copy_(flat[0][s:s + b.shape[1]])
        for i in range(1, n):
            torch.sub(flat[i][s:s + b.shape[1]], b[0], out=b[i])  # promoted to fp32, exact for bf16
        if n <= 4:  # a skinny GEMM is slower than separate dot products
            for i in range(n):
                for j in range(i, n):
                    few[i][j] += torch.dot(b[i], b[j]).item()
        else:
            acc += (b @ b.T).double()
    if n <= 4:
        acc = torch.tensor([[few[min(i, j)][max(i, j)] for j in range(n)] for i in range(n)], dtype=torch.float64)
    # acc = [[n, c^T], [c, D]] -> G = n + c_i + c_j + D_ij (c_0 = 0, D_0j = 0)
    c = acc[0].clone()
    c[0] = 0.0
    d = acc.clone()
    d[0, :] = 0.0
    d[:, 0] = 0.0
    return acc[0, 0] + c[:, None] + c[None, :] + d


class BufferRing:
    """``size`` reusable output buffers of ``chunk`` elements, handed out in turn. A consumer that
    holds at most ``size - 1`` earlier chunks (the writer's bounded queue plus the one it is writing)
    never sees a buffer overwritten; reusing them spares the page faults and zeroing of fresh
    allocations (as much memory as the whole output, otherwise)."""

    def __init__(self, size: int, chunk: int = CHUNK) -> None:
        self.size, self.chunk, self.i = size, chunk, 0
        self.bufs: list[torch.Tensor] = []

    def __call__(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        if len(self.bufs) < self.size:
            self.bufs.append(torch.empty(self.chunk * 8, dtype=torch.uint8))
        buf = self.bufs[self.i % self.size]
        self.i += 1
        if nbytes > buf.numel():
            raise ValueError(f"chunk of {numel} {dtype} exceeds the ring's {buf.numel()} bytes")
        return buf[:nbytes].view(dtype)


def combine_chunks(xs: list[torch.Tensor], coeffs: torch.Tensor, dtype: torch.dtype, chunk: int = CHUNK,
                   block: int = BLOCK, buffers=None):
    """Yield ``sum_i c_i x_i`` in chunks of ``chunk`` elements (fp32 arithmetic per cached block,
    cast to ``dtype``), each in a fresh tensor or in ``buffers(numel, dtype)`` (a ``BufferRing``)."""
    flat = [x.reshape(-1) for x in xs]
    size = flat[0].numel()
    c = [float(v) for v in coeffs]
    buf = torch.empty(max(1, min(block, size)), dtype=torch.float32)
    for cs in range(0, size, chunk):
        numel = min(chunk, size - cs)
        out = buffers(numel, dtype) if buffers is not None else torch.empty(numel, dtype=dtype)
        for s in range(0, out.numel(), block):
            m = min(block, out.numel() - s)
            acc = buf[:m].copy_(flat[0][cs + s:cs + s + m]).mul_(c[0])
            for ci, f in zip(c[1:], flat[1:]):
                acc.add_(f[cs + s:cs + s + m], alpha=ci)  # promoted to fp32 inside the kernel
            out[s:s + m].copy_(acc)
        yield out


def combine(xs: list[torch.Tensor], coeffs: torch.Tensor, dtype: torch.dtype | None = None,
            chunk: int = CHUNK) -> torch.Tensor:
    dtype = dtype or xs[0].dtype
    return torch.cat(list(combine_chunks(xs, coeffs, dtype, chunk))).view(xs[0].shape)
