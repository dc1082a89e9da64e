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

Both passes run in the fused C kernels of ``kernels.c`` (``native.py``) where they build, in one sweep
over the inputs each; the torch code below is the fallback and the readable statement of the same
arithmetic (the two agree to fp32 rounding, not bit for bit).
"""

from __future__ import annotations

import torch

from qwen3train.merge import native

BLOCK = 1 << 18  # elements per block
CHUNK = 1 << 18  # elements per output chunk handed to the writer (512 KiB of bf16: the ring stays in cache)


def gram(xs: list[torch.Tensor], block: int = BLOCK) -> torch.Tensor:
    """``[n, n]`` float64 Gram matrix of the flattened tensors (see the module docstring)."""
    flat = [x.reshape(-1) for x in xs]
    n, size = len(flat), flat[0].numel()
    if native.supports(flat):
        return _assemble(native.gram_frame(flat))
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
        return _assemble([[few[min(i, j)][max(i, j)] for j in range(n)] for i in range(n)])
    return _assemble(acc)


def _assemble(acc) -> torch.Tensor:
    """``acc = [[n, c^T], [c, D]]`` (a tensor or nested lists) -> ``G_ij = n + c_i + c_j + D_ij``
    (``c_0 = 0``, ``D_0j = 0``), in float64."""
    a = acc.tolist() if isinstance(acc, torch.Tensor) else acc
    k = len(a)
    c = [0.0] + [a[0][i] for i in range(1, k)]
    return torch.tensor([[a[0][0] + c[i] + c[j] + (a[i][j] if i and j else 0.0) for j in range(k)]
                         for i in range(k)], dtype=torch.float64)


class BufferRing:
    """``size`` reusable output buffers of ``chunk`` elements, handed out in turn. A consumer that
    holds at most ``size - 1`` earlier chunks (the writer's bounded queue plus the one it is writing)
    never sees a buffer overwritten; reusing them spares the page faults and zeroing of fresh
    allocations (as much memory as the whole output, otherwise)."""

    def __init__(self, size: int, chunk: int | None = None) -> None:
        self.size, self.chunk, self.i = size, chunk or CHUNK, 0
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


def combine_chunks(xs: list[torch.Tensor], coeffs: torch.Tensor, dtype: torch.dtype, chunk: int | None = None,
                   block: int = BLOCK, buffers=None):
    """Yield ``sum_i c_i x_i`` in chunks of ``chunk`` elements (fp32 arithmetic per cached block,
    cast to ``dtype``), each in a fresh tensor or in ``buffers(numel, dtype)`` (a ``BufferRing``)."""
    flat = [x.reshape(-1) for x in xs]
    size = flat[0].numel()
    chunk = chunk or (buffers.chunk if buffers is not None else CHUNK)
    c = [float(v) for v in coeffs]
    fused = native.supports(flat) and dtype in native.DTYPES
    buf = torch.empty(0 if fused else max(1, min(block, size)), dtype=torch.float32)
    for cs in range(0, size, chunk):
        numel = min(chunk, size - cs)
        out = buffers(numel, dtype) if buffers is not None else torch.empty(numel, dtype=dtype)
        if fused:
            native.combine_into(flat, c, cs, out)
            yield out
            continue
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
