"""Exact top-k by dot product, chunked over queries and documents: the score matrix is never
materialised beyond ``q_chunk x d_chunk``; a running top-k is merged chunk by chunk. Either side may
be a (memory-mapped) NumPy array: only one chunk of it is made resident at a time."""

from __future__ import annotations

import numpy as np
import torch


def _rows(x, start: int, stop: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32))
    return x[start:stop]


def topk(q, d, k: int, q_chunk: int = 4096, d_chunk: int = 65536):
    """-> (scores [Q, k], indices [Q, k]) sorted by score, descending."""
    k = min(k, d.shape[0])
    out_v, out_i = [], []
    for qs in range(0, q.shape[0], q_chunk):
        qb = _rows(q, qs, qs + q_chunk)
        best_v = torch.full((qb.shape[0], k), float("-inf"))
        best_i = torch.zeros((qb.shape[0], k), dtype=torch.long)
        for ds in range(0, d.shape[0], d_chunk):
            s = qb @ _rows(d, ds, ds + d_chunk).T
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + ds], 1)
            best_v, pos = cat_v.topk(k, dim=1)
            best_i = cat_i.gather(1, pos)
        out_v.append(best_v)
        out_i.append(best_i)
    return torch.cat(out_v), torch.cat(out_i)


def topk_faiss(q, d, k: int, d_chunk: int = 1 << 20):
    """The same with a FAISS flat inner-product index (optional dependency, for very large corpora)."""
    import faiss

    index = faiss.IndexFlatIP(d.shape[1])
    for ds in range(0, d.shape[0], d_chunk):
        index.add(_rows(d, ds, ds + d_chunk).numpy())
    v, i = index.search(_rows(q, 0, q.shape[0]).numpy(), min(k, d.shape[0]))
    return torch.from_numpy(v), torch.from_numpy(i).long()
