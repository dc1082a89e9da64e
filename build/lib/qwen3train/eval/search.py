"""Exact top-k by dot product, on the GPU when there is one.

The score matrix is never materialised beyond ``q_chunk x d_chunk``; a running top-k is merged
chunk by chunk. Either side may be a (memory-mapped) NumPy array: only one chunk of it is made
resident at a time on the host.

``ExactSearch(corpus)`` is built once per corpus and searched many times (mining searches one block
of queries after another): on a GPU the corpus embeddings are uploaded once and stay on the device
when they fit in ``max_resident_fraction`` of its free memory (MS MARCO, 8.8M x 1024 float32 =
36 GB, fits an 80 GB card), else they stream through in ``d_chunk`` slices. The same code runs on
the CPU, where "resident" is the (memory-mapped) array itself, so the CPU tests cover the device path's
arithmetic; scores stay float32 on every device, so the CPU and GPU rank the same way up to float
rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def search_device() -> torch.device:
    """The current CUDA device when there is one (each process of a multi-GPU run has its own)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rows(x, start: int, stop: int, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32))
        return t.to(device, non_blocking=True) if device.type != "cpu" else t
    return x[start:stop].to(device=device, dtype=torch.float32)


class ExactSearch:
    """Exact inner-product top-k over a fixed corpus ``[N, D]`` (NumPy, memory map or tensor)."""

    def __init__(self, corpus, device: torch.device | str | None = None, d_chunk: int = 65536,
                 max_resident_fraction: float = 0.5, resident: bool | None = None) -> None:
        """``resident``: keep the corpus on ``device`` (None: on a GPU when it fits)."""
        self.device = torch.device(device) if device is not None else search_device()
        self.d_chunk = d_chunk
        self.n = int(corpus.shape[0])
        self.corpus = corpus
        if resident is None:
            resident = self.device.type == "cuda" and (
                self.n * corpus.shape[1] * 4 <= max_resident_fraction * torch.cuda.mem_get_info(self.device)[0])
        self.resident = None
        if resident and self.n:
            self.resident = torch.cat([_rows(corpus, s, s + d_chunk, self.device) for s in range(0, self.n, d_chunk)])

    def _chunks(self):
        for ds in range(0, self.n, self.d_chunk):
            if self.resident is not None:
                yield ds, self.resident[ds:ds + self.d_chunk]
            else:
                yield ds, _rows(self.corpus, ds, ds + self.d_chunk, self.device)

    def topk(self, q, k: int, q_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores [Q, k], indices [Q, k]) on the CPU, sorted by score, descending."""
        k = min(k, self.n)
        out_v, out_i = [], []
        for qs in range(0, q.shape[0], q_chunk):
            qb = _rows(q, qs, qs + q_chunk, self.device)
            best_v = torch.full((qb.shape[0], k), float("-inf"), device=self.device)
            best_i = torch.zeros((qb.shape[0], k), dtype=torch.long, device=self.device)
            for ds, db in self._chunks():
                s = qb @ db.T
                v, i = s.topk(min(k, s.shape[1]), dim=1)
                cat_v, cat_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + ds], 1)
                best_v, pos = cat_v.topk(k, dim=1)
                best_i = cat_i.gather(1, pos)
            out_v.append(best_v.cpu())
            out_i.append(best_i.cpu())
        if not out_v:
            return torch.empty((0, k)), torch.empty((0, k), dtype=torch.long)
        return torch.cat(out_v), torch.cat(out_i)


def topk(q, d, k: int, q_chunk: int = 4096, d_chunk: int = 65536, device: torch.device | str | None = None):
    """One-off search: -> (scores [Q, k], indices [Q, k]) sorted by score, descending (CPU tensors)."""
    return ExactSearch(d, device=device, d_chunk=d_chunk).topk(q, k, q_chunk=q_chunk)


class FaissSearch:
    """The same with a FAISS flat inner-product index (optional dependency). With a GPU build of
    FAISS and CUDA present the index is put on every visible GPU (float32, exact); otherwise CPU."""

    def __init__(self, corpus, d_chunk: int = 1 << 20, use_gpu: bool | None = None) -> None:
        import faiss

        cpu = torch.device("cpu")
        index = faiss.IndexFlatIP(corpus.shape[1])
        for ds in range(0, corpus.shape[0], d_chunk):
            index.add(_rows(corpus, ds, ds + d_chunk, cpu).numpy())
        if use_gpu is None:
            use_gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self.on_gpu = bool(use_gpu)
        if self.on_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        self.index, self.n = index, int(corpus.shape[0])

    def topk(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = self.index.search(_rows(q, 0, q.shape[0], torch.device("cpu")).numpy(), min(k, self.n))
        return torch.from_numpy(v), torch.from_numpy(i).long()


def topk_faiss(q, d, k: int, d_chunk: int = 1 << 20):
    return FaissSearch(d, d_chunk=d_chunk).topk(q, k)
