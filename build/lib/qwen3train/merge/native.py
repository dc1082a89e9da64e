"""The fused merge kernels of ``kernels.c``, compiled on first use and loaded with ctypes.

The build needs a C compiler (``$CC``, else ``cc``/``gcc``/``clang``); it is tried once
per source version and machine, with ``-march=native`` and then without, and cached as
``$QWEN3TRAIN_CACHE/kernels/<hash>.so`` (default ``~/.cache/qwen3train``; a temporary folder when
that is not writable), written atomically so concurrent processes may build at once. When no
compiler works, or ``QWEN3TRAIN_NATIVE=0``, merging uses the torch implementation in ``gram.py``
(same formulas, about 2x slower on CPU) and says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SRC = Path(__file__).with_name("kernels.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
THREADS = 0  # kernel threads; 0: all of torch's threads but one, left to the output writer


def threads() -> int:
    """On a few cores the writer's thread (copying the output into the page cache, all through the
    merge) gains more from a core of its own than the kernels would (measured on 2 cores: 0.53-0.63 s
    with one kernel thread, 0.67-0.81 s with two)."""
    return THREADS if THREADS > 0 else max(1, torch.get_num_threads() - 1)


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN3TRAIN_CACHE", Path.home() / ".cache" / "qwen3train")) / "kernels"


def _machine_key() -> str:
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{flags}"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = SRC.read_bytes()
    key = hashlib.sha256(src + _machine_key().encode() + cc.encode()).hexdigest()[:16]
    fallback = Path(tempfile.gettempdir()) / f"qwen3train-kernels-{getattr(os, 'getuid', int)()}"
    for folder in (cache_dir(), fallback):
        so = folder / f"merge-{key}.so"
        if so.exists():
            return so
        try:  # a read-only cache (a shared home on a cluster): build in the temporary folder instead
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                break
        except OSError:
            pass
    errors = []
    for arch in (["-march=native"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
        os.close(fd)
        cmd = [cc, "-O3", *arch, "-fopenmp-simd", "-fno-strict-aliasing", "-shared", "-fPIC", str(SRC), "-o", tmp]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode == 0:
            os.replace(tmp, so)
            return so
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {p.stderr.strip()[-500:]}")
    raise RuntimeError("\n".join(errors))


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None (torch fallback) when disabled or unbuildable."""
    global _lib
    if _lib is not False:
        return _lib
    if os.environ.get("QWEN3TRAIN_NATIVE", "1") == "0":
        _lib = None
        return None
    try:
        so = ctypes.CDLL(str(_build()))
        p = ctypes.c_void_p
        i32, i64 = ctypes.c_int, ctypes.c_int64
        so.q3t_gram_part.argtypes = [p, i32, i32, i64, i64, i64, p]
        so.q3t_combine.argtypes = [p, p, i32, i32, i64, i64, p, i32]
        for f in (so.q3t_gram_part, so.q3t_combine, so.q3t_max_inputs, so.q3t_block):
            f.restype = i32
        _lib = so
    except (OSError, RuntimeError) as e:
        log.warning("fused merge kernels unavailable, using torch ops (slower): %s", e)
        _lib = None
    return _lib


def supports(xs: list[torch.Tensor]) -> bool:
    """Whether the kernels take these inputs: CPU, contiguous, one supported dtype, few enough."""
    so = lib()
    return (so is not None and len(xs) <= so.q3t_max_inputs() and xs[0].dtype in DTYPES
            and all(x.device.type == "cpu" and x.dtype == xs[0].dtype and x.is_contiguous() for x in xs))


def _pointers(xs: list[torch.Tensor]):
    return (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])


_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool), grown on demand


def _run(calls: list) -> None:
    """Run the kernel calls (each returns 0 on success) at once: the first on this thread, the others
    on a pool (ctypes releases the GIL), waiting for all."""
    global _pool
    futures = []
    if len(calls) > 1:
        if _pool is None or _pool[0] < len(calls) - 1:
            _pool = (len(calls) - 1, ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="q3t-merge"))
        futures = [_pool[1].submit(c) for c in calls[1:]]
    rcs = [calls[0]()] + [f.result() for f in futures]
    if any(rcs):
        raise RuntimeError(f"merge kernel failed ({rcs})")


def _split(total: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """[start, end) ranges cutting ``total`` into at most ``parts`` pieces of whole ``unit``s."""
    units = -(-total // unit)
    parts = max(1, min(parts, units))
    bounds = [min(total, (units * i // parts) * unit) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


MIN_PER_THREAD = 1 << 20  # elements: below this, waking another thread costs more than it saves


def gram_frame(xs: list[torch.Tensor]) -> list[list[float]]:
    """``[[n, c^T], [c, D]]`` of gram.py's frame (float64 values), in one sweep. Super-block partials
    are added with ``math.fsum`` (exactly rounded), so the result is the same for any thread count."""
    so, n, size = lib(), len(xs), xs[0].numel()
    nn, nsuper = n * n, max(1, -(-size // so.q3t_block()))
    part = (ctypes.c_double * (nsuper * nn))()
    addr, ptrs, dt = ctypes.addressof(part), _pointers(xs), DTYPES[xs[0].dtype]
    ranges = _split(nsuper, min(threads(), max(1, size // MIN_PER_THREAD)))
    _run([lambda a=a, b=b: so.q3t_gram_part(ptrs, n, dt, size, a, b, addr + a * nn * 8) for a, b in ranges])
    upper = {(i, k): math.fsum(part[i * n + k::nn]) for i in range(n) for k in range(i, n)}
    return [[upper[min(i, k), max(i, k)] for k in range(n)] for i in range(n)]


def combine_into(xs: list[torch.Tensor], coeffs: list[float], start: int, out: torch.Tensor) -> None:
    """``out = sum_i c_i x_i[start:start + out.numel()]`` (flat), fp32 arithmetic."""
    if out.dtype not in DTYPES or not out.is_contiguous():
        raise ValueError(f"unsupported output {out.dtype}")
    so, n = lib(), len(xs)
    c = (ctypes.c_double * n)(*coeffs)
    ptrs, dt, dto, size = _pointers(xs), DTYPES[xs[0].dtype], DTYPES[out.dtype], out.numel()
    base, item = out.data_ptr(), out.element_size()
    ranges = _split(size, min(threads(), max(1, size // MIN_PER_THREAD)), unit=4096)
    _run([lambda a=a, b=b: so.q3t_combine(ptrs, c, n, dt, start + a, b - a, base + a * item, dto)
          for a, b in ranges])
