"""Any embedder behind one small interface: qwen3train / Qwen3-Embedding exports (last-token,
instruction-aware) or any sentence-transformers folder (e.g. all-MiniLM-L6-v2, mean pooling).

``encode_queries(texts, instruction)`` / ``encode_docs(texts)`` return L2-normalised float32
tensors in input order. ``precision`` picks the compute dtype: ``float32`` (default here: evaluation
figures must not depend on the machine), ``bfloat16`` / ``float16``, or ``auto`` = bfloat16 where the
hardware computes it natively (CUDA with bf16, x86 CPUs with AVX512-BF16 or AMX, Arm CPUs with BF16),
float32 elsewhere. Embeddings are always returned (and cached) in float32. ``cached_docs`` stores
document embeddings on disk keyed by the model's weights, the texts and the settings (under the same
name as mining's store), so a corpus is encoded once and reused by mining and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from qwen3train.errors import OutOfMemory, private_tmp
from qwen3train.models.fit import is_out_of_memory
from qwen3train.precision import cpu_has_native_bf16

PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # and their short names (qwen3train.precision)


def resolve_precision(precision: str, key: str = "precision") -> str:
    """The torch dtype name to encode in: ``precision`` in the one vocabulary (``qwen3train.precision``),
    ``auto`` resolved for this machine."""
    from qwen3train.precision import DTYPE_NAMES, precision_name

    precision = DTYPE_NAMES[precision_name(precision, key)]
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def is_decoder_export(path: Path) -> bool:
    """A qwen3train export, a Qwen-family embedder, or any plain decoder LLM folder (no sentence-transformers
    ``modules.json``: e.g. a base SmolLM2 scored with last-token pooling) -> our last-token embedder."""
    if (path / "qwen3train.json").exists():
        return True
    cfg = path / "config.json"
    if not cfg.exists():
        return False
    arch = json.loads(cfg.read_text()).get("model_type", "")
    return arch.startswith("qwen") or not (path / "modules.json").exists()


def _content_hash(path: Path) -> str:
    """Hash of a weight file's bytes (~1 GB/s: a second for a 0.6B model, small beside encoding)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _update_with_texts(h, texts: list[str]) -> None:
    """Feed ``h`` (a hashlib object) the texts in order, each as an 8-byte digest of its own."""
    for t in texts:
        h.update(hashlib.blake2b(t.encode(), digest_size=8).digest())


class Encoder:
    def __init__(self, path: str | os.PathLike, *, max_length: int = 512, batch_size: int = 64,
                 dim: int | None = None, precision: str = "float32", end_token: str | None = None,
                 label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label  # names the progress lines of this encoder's work (None: silent)
        self.precision = resolve_precision(precision)
        self.batch_size = batch_size
        self.dim = dim
        self.max_length = max_length
        self._fingerprint: str | None = None  # the weights' hash, computed on first use (fingerprint)
        # full-dimension vectors kept by the texts they encode, while ``remember`` (an evaluation of several
        # Matryoshka dims: each dim reads the same vectors, ``_dim``); ``forget`` lets them go
        self.remember, self._memo = False, {}
        self.kind = "qwen3train" if is_decoder_export(self.path) else "sentence-transformers"
        if self.kind == "qwen3train":
            from qwen3train.models.build import ModelConfig, build_embedder

            # end_token: for a raw decoder (a base model), the token training appends; exports record theirs
            self.model = build_embedder(ModelConfig(name_or_path=str(self.path), max_query_length=max_length,
                                                    max_doc_length=max_length, dtype=self.precision,
                                                    end_token=end_token))
            if torch.cuda.is_available():
                self.model.cuda()
        else:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(self.path), device="cuda" if torch.cuda.is_available() else "cpu")
            self.model.max_seq_length = min(max_length, self.model.max_seq_length or max_length)
            if self.precision != "float32":
                self.model.to(getattr(torch, self.precision))

    def encode_full(self, texts: list[str], instruction: str | None = None) -> torch.Tensor:
        """Full-dimension, normalised, whatever ``dim`` says (what a store or the cache holds). Matryoshka dims
        are applied afterwards (``_dim``): since normalize(normalize(x)[:d]) == normalize(x[:d]), one encoding
        (and one cache) serves every dim."""
        if self.remember:
            h = hashlib.blake2b(digest_size=16)
            _update_with_texts(h, texts)
            key = (instruction, len(texts), h.hexdigest())
            if key not in self._memo:
                self._memo[key] = self._encode_full(texts, instruction)
            return self._memo[key]
        return self._encode_full(texts, instruction)

    def forget(self) -> None:
        self._memo.clear()

    def _encode_full(self, texts: list[str], instruction: str | None) -> torch.Tensor:
        from qwen3train.progress import Progress, mode

        desc = f"encode {self.label} {'queries' if instruction else 'documents'}" if self.label else None
        if self.kind == "qwen3train":
            return self.model.encode(texts, instruction=instruction, batch_size=self.batch_size, progress=desc)
        with Progress(len(texts), desc, "texts") as bar:
            v = self._st_encode(list(texts), show_progress_bar=bool(desc) and mode() == "bar")
            bar.update(len(texts))
        return torch.nn.functional.normalize(v.float(), dim=-1)  # instruction-unaware: raw text

    def _st_encode(self, texts: list[str], **kw) -> torch.Tensor:
        """A sentence-transformers model's vectors; out of device memory, again with half the batch (as the
        project's own models do per forward: models/fit.py), kept for later calls."""
        while True:
            try:
                return torch.as_tensor(self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                                         normalize_embeddings=False, **kw))
            except Exception as e:  # noqa: BLE001 - only out of memory is caught (wrapped too: models/fit.py)
                if not is_out_of_memory(e):
                    raise
                if self.batch_size == 1:
                    raise OutOfMemory(f"out of device memory encoding one text with {self.path}: lower max_length "
                                      f"({self.max_length}) or free the device") from None
            self.batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"note: out of device memory encoding with {self.path}; going on with batches of "
                  f"{self.batch_size} (the same results, more forwards)", flush=True)

    def _dim(self, v):
        """``v`` (a tensor, or the cache's memory map) cut to ``dim`` and normalised again; as it is without one."""
        if not self.dim:
            return v
        v = v[:, : self.dim]
        v = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        return torch.nn.functional.normalize(v, dim=-1)

    def encode_queries(self, texts: list[str], instruction: str | None) -> torch.Tensor:
        return self._dim(self.encode_full(texts, instruction))

    def encode_docs(self, texts: list[str], instruction: str | None = None) -> torch.Tensor:
        return self._dim(self.encode_full(texts, instruction))

    def fingerprint(self, by_content: bool = True) -> str:
        """Names the weights by content, not by path or time: a copy of a checkpoint (the merge stage's
        fallback output) reuses its cached vectors, and any changed byte gets new ones. Hashed once per
        encoder (the weights it loaded do not change): mining keys every store it writes by it, and hashing
        1.2 GB of weights for each was ~1 s apiece (measured in docs/benchmarks.md).

        ``by_content=False``: by each weight file's resolved path, size and modification time instead, read
        in microseconds. For a store that lives only as long as one run (mining without a cache folder),
        where the key's one job is to let a rerun after a kill reuse the finished chunks of the same
        weights; hashing the content there cost 1 s per GB of weights (16 s for an 8B model) on every run."""
        if not by_content:
            return self._hash_weights(by_content=False)
        if self._fingerprint is None:
            self._fingerprint = self._hash_weights()
        return self._fingerprint

    def _hash_weights(self, by_content: bool = True) -> str:
        h = hashlib.sha256(b"" if by_content else b"stat:")
        for f in sorted(self.path.rglob("*.safetensors")) + sorted(self.path.rglob("*.bin")):
            if by_content:
                h.update(f"{f.relative_to(self.path)}:{_content_hash(f)}".encode())
            else:
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f"{self.kind}:{self.max_length}:{self.precision}".encode())
        if self.kind == "qwen3train":  # the appended token changes every vector
            h.update(self.model.tok.end_token.encode())
        return h.hexdigest()[:16]

    def cached_docs(self, texts: list[str], cache_dir: str | os.PathLike | None,
                    instruction: str | None = None):
        """``encode_docs`` with an on-disk cache (``<cache_dir>/<key>.npy``, written atomically). Read from the
        cache at full dimension it is a read-only memory map (a float32 array), not a tensor in memory: MS
        MARCO's 8.8M passages are 36 GB at 1,024 dimensions, 144 GB at the 8B model's 4,096, which the search
        (``eval.search``) streams through a chunk at a time."""
        if not cache_dir:
            return self.encode_docs(texts, instruction)
        return self._dim(self._cached_full(texts, cache_dir, instruction))

    def cache_key(self, texts: list[str], instruction: str | None = None, by_content: bool = True) -> str:
        """Names the embeddings of ``texts`` by this model's weights (``fingerprint``), settings and the texts."""
        h = hashlib.sha256(self.fingerprint(by_content).encode())
        h.update((instruction or "").encode())
        _update_with_texts(h, texts)
        return h.hexdigest()[:24]

    def _cached_full(self, texts: list[str], cache_dir, instruction: str | None):
        # the same name as mining's store (qwen3train.mining.store): one encoded corpus serves both
        key = self.cache_key(texts, "doc:" + (instruction or ""))
        path = Path(cache_dir) / f"{key}.npy"
        if path.exists():
            return np.load(path, mmap_mode="r")
        vec = self.encode_full(texts, instruction)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = private_tmp(path, ".tmp.npy")
        np.save(tmp, vec.numpy())
        tmp.replace(path)
        return vec


def encode_grouped(encode, items: list[tuple[str | None, str]]) -> torch.Tensor:
    """``[len(items), D]``: the vectors of (instruction, text) items in their order, ``encode(texts, instruction)``
    called once per instruction and each distinct item encoded once (a mined negative recurs across records).
    The cosine filter's pairs and ``make score``'s embedder teacher."""
    first: dict[tuple[str | None, str], int] = {}
    where = [first.setdefault(item, len(first)) for item in items]  # item -> its distinct item
    distinct = list(first)
    by: dict[str | None, list[int]] = {}
    for u, (instr, _) in enumerate(distinct):
        by.setdefault(instr, []).append(u)
    out = None
    for instr, ids in by.items():
        vec = encode([distinct[u][1] for u in ids], instr)
        out = torch.empty((len(distinct), vec.shape[1])) if out is None else out
        out[ids] = vec.float()
    return out[where] if out is not None else torch.empty((0, 1))
