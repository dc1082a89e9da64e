"""Encode a large text list to an on-disk embedding store: chunked, sharded across processes,
resumable, memory-mapped on read.

The texts are cut into chunks of ``chunk_size``; chunk ``c`` is encoded by rank ``c % world`` (each
chunk sorted by length inside the encoder, so batches pad little) and saved atomically as
``<store>/<key>.parts/<c>.npy``. A killed run keeps every finished chunk and a rerun encodes only the
missing ones. When all chunks exist, rank 0 streams them into ``<store>/<key>.npy`` (float32,
``[N, D]``) and removes the parts; every rank then reads the result memory-mapped, so the resident
memory of a caller is one chunk of embeddings, not the corpus. ``key`` is ``Encoder.cache_key``
(weights, settings, instruction, texts): a store is reused by later mining runs and by evaluation
(``Encoder.cached_docs``) with the same model; it holds full-dimension vectors (a Matryoshka dim is applied
on read, ``Encoder._dim``). Evaluation on several processes encodes its corpora here (``eval.run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from qwen3train import dist, stall
from qwen3train.errors import private_tmp, writing
from qwen3train.eval.encoder import Encoder


def encode_to_store(enc: Encoder, texts: list[str], store: str | Path, *, instruction: str | None = None,
                    query: bool = False, chunk_size: int = 16384, log=None, by_content: bool = True) -> np.ndarray:
    """-> read-only memory map ``[len(texts), D]`` of normalised float32 embeddings in input order.

    ``by_content=False`` for a store deleted at the end of its run: the weights are named by their files'
    path, size and time (``Encoder.fingerprint``), not hashed."""
    store = Path(store)
    key = enc.cache_key(texts, instruction if query else "doc:" + (instruction or ""), by_content)
    final = store / f"{key}.npy"
    if not final.exists():
        parts = store / f"{key}.parts"
        parts.mkdir(parents=True, exist_ok=True)
        n_chunks = max(1, -(-len(texts) // chunk_size))
        what = "queries" if query else "documents"
        for c in range(dist.rank(), n_chunks, dist.world_size()):
            path = parts / f"{c:06d}.npy"
            if path.exists():
                continue  # finished before an interruption
            if final.exists():
                break  # another job sharing this store (same model and texts) assembled it meanwhile
            stall.enter(f"the encoding of {what} (chunk {c + 1} of {n_chunks})")
            chunk = texts[c * chunk_size:(c + 1) * chunk_size]
            vec = enc.encode_full(chunk, instruction)  # every dim: the key names full vectors (Encoder._dim)
            tmp = private_tmp(path, ".tmp.npy")
            with writing(path, tmp, kept="every finished chunk is kept"):
                np.save(tmp, vec.numpy().astype(np.float32, copy=False))
            tmp.replace(path)
            if log:
                log(f"encoded chunk {c + 1}/{n_chunks} ({len(chunk)} texts) on rank {dist.rank()}")
        stall.enter(f"the wait for the other ranks' chunks of {what}")
        dist.barrier()
        if dist.is_main() and not final.exists():
            stall.enter(f"the assembly of the {what}' chunks")
            _assemble(parts, n_chunks, len(texts), final)
        stall.enter(f"the wait for the assembly of the {what}' chunks")
        dist.barrier()
    return np.load(final, mmap_mode="r")


def _assemble(parts: Path, n_chunks: int, n: int, final: Path) -> None:
    """The chunks streamed into one ``.npy`` file in order (written sequentially, not through a memory map:
    a full disk is then an error naming the file, where a write into a mapped page kills the process)."""
    first = np.load(parts / f"{0:06d}.npy", mmap_mode="r")
    tmp = private_tmp(final, ".tmp.npy")
    with writing(final, tmp, kept=f"every encoded chunk is kept ({parts})"), open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (n, first.shape[1])})
        row = 0
        for c in range(n_chunks):
            part = np.load(parts / f"{c:06d}.npy", mmap_mode="r")
            f.write(np.ascontiguousarray(part, dtype=np.float32).data)
            row += len(part)
        if row != n:
            raise RuntimeError(f"embedding store {parts}: chunks hold {row} rows, expected {n}")
    tmp.replace(final)
    shutil.rmtree(parts, ignore_errors=True)  # a job sharing this store may have assembled it too


def join_parts(parts: list[Path], final: Path) -> None:
    """Concatenate per-rank part files in order into ``final`` (atomically), removing the parts."""
    tmp = final.with_name(f".{final.name}.joining")
    with open(tmp, "wb") as w:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, w)
    tmp.replace(final)
    for p in parts:
        p.unlink()
