"""Reading checkpoints tensor by tensor, and writing safetensors without holding the model.

Readers accept a folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json``,
weight names with or without a ``model.`` prefix, and PEFT LoRA adapter folders (each adapted
weight is returned as ``W + (alpha / r) B A`` against the adapter's base, one tensor at a time).
The writer plans every shard's header from shapes and dtypes first, then streams each tensor's bytes
to its offset, so peak memory is one tensor (plus the merge's inputs), not a shard.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


class MergeError(ValueError):
    pass


def canonical(name: str) -> str:
    """Weight name without wrapper prefixes: ``base_model.model.``, ``model.``."""
    for prefix in ("base_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


class FolderReader:
    """Tensors of a Hugging Face folder by canonical name, read from memory-mapped safetensors.

    Each file's header is parsed once and the file mapped once (copy-on-write, so tensors are
    writable views that never touch the file); ``get`` returns a view without copying. Tensors come
    in file order (``keys``), so a merge reads every file front to back; ``stream_tensors`` reads ahead.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise MergeError(f"{index}: not a safetensors index ({e})") from None
            paths = sorted({self.folder / v for v in weight_map.values()})
        elif single.exists():
            paths = [single]
        else:
            raise MergeError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        self.source_folder = self.folder  # where config and tokenizer live
        self.names: dict[str, str] = {}  # canonical -> stored name
        self._where: dict[str, tuple[int, int, int]] = {}  # canonical -> (file, start byte, end byte)
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._maps: list[mmap.mmap | None] = [None] * len(paths)
        self._addr: list[int | None] = [None] * len(paths)
        self.paths = paths
        entries = []
        for fi, path in enumerate(paths):
            for name, (dt, shape, start, end) in read_header(path).items():
                entries.append((fi, start, name, dt, shape, end))
        for fi, start, name, dt, shape, end in sorted(entries, key=lambda e: (e[0], e[1], e[5], e[2])):
            key = canonical(name)
            if key in self.names:
                raise MergeError(f"{self.folder}: tensor {name!r} and {self.names[key]!r} are the same weight")
            self.names[key] = name
            self._meta[key] = (dt, shape)
            self._where[key] = (fi, start, end)

    def keys(self) -> list[str]:
        return list(self.names)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._meta[key]

    def _map(self, fi: int) -> mmap.mmap:
        if self._maps[fi] is None:
            with open(self.paths[fi], "rb") as f:
                self._maps[fi] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[fi]

    def get(self, key: str) -> torch.Tensor:
        fi, start, end = self._where[key]
        dt, shape = self._meta[key]
        if end == start:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(self._map(fi), dtype=dt, count=(end - start) // dt.itemsize,
                                offset=start).view(shape)

    def _advise(self, key: str, advice: int) -> None:
        fi, start, end = self._where[key]
        lo = start - start % mmap.PAGESIZE
        if end > lo:
            m = self._map(fi)
            if self._addr[fi] is None:
                self._addr[fi] = ctypes.addressof(ctypes.c_char.from_buffer(m))
            madvise(self._addr[fi] + lo, end - lo, advice)

    def prefetch(self, key: str) -> None:
        """Start reading the tensor's pages from disk, asynchronously (MADV_WILLNEED)."""
        self._advise(key, MADV_WILLNEED)

    def populate(self, key: str) -> None:
        """Map the tensor's pages into this process, reading them if needed (MADV_POPULATE_READ): one
        call instead of a page fault per 4 KiB; the GIL is released meanwhile."""
        self._advise(key, MADV_POPULATE_READ)


MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux >= 5.14; refused (and ignored) elsewhere
_libc = None


def madvise(addr: int, length: int, advice: int) -> bool:
    """libc ``madvise`` through ctypes (which releases the GIL, unlike ``mmap.madvise``); a hint only:
    False where the system refuses it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return bool(_libc) and _libc.madvise(addr, length, advice) == 0


def stream_tensors(readers, keys: list[str]):
    """Yield ``(key, [the tensor of each reader])`` in order while a helper thread maps the next
    tensor's pages (reading them from disk if they are not cached) and asks for the one after."""
    def load(i: int) -> None:
        for r in readers:
            if i + 1 < len(keys):
                r.prefetch(keys[i + 1])
            r.populate(keys[i])

    if not keys:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="q3t-read") as pool:
        ahead = pool.submit(load, 0)
        for i, k in enumerate(keys):
            ahead.result()
            if i + 1 < len(keys):
                ahead = pool.submit(load, i + 1)
            yield k, [r.get(k) for r in readers]


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, start, end) with absolute byte offsets, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise MergeError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MergeError(f"{path}: unreadable safetensors header ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape = _dtype(info["dtype"]), tuple(int(d) for d in info["shape"])
            start, end = (8 + n + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise MergeError(f"{path}: tensor {name!r}: bad header entry {info!r} ({e})") from None
        if end - start != _nbytes(dt, shape) or end > size or (start - 8 - n) % dt.itemsize:
            raise MergeError(f"{path}: tensor {name!r}: offsets {info['data_offsets']} do not fit dtype "
                             f"{info['dtype']}, shape {list(shape)} and file size {size}")
        out[name] = (dt, shape, start, end)
    return out


class LoraReader:
    """A PEFT LoRA adapter folder read as full weights: ``W + (alpha / r) * B @ A`` per tensor."""

    def __init__(self, folder: str | Path, base: str | Path | None = None) -> None:
        self.folder = Path(folder)
        cfg = json.loads((self.folder / "adapter_config.json").read_text())
        base = base or cfg.get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise MergeError(f"{self.folder}: LoRA adapter base model {base!r} is not a local folder")
        self.base = FolderReader(base)
        self.source_folder = self.base.folder
        self.names = self.base.names
        self.scale = cfg["lora_alpha"] / cfg["r"]
        with safe_open(self.folder / "adapter_model.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.delta_ab: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, a in tensors.items():
            if ".lora_A." in k:
                stem = canonical(k.split(".lora_A.")[0])
                b = tensors[k.replace(".lora_A.", ".lora_B.")]
                self.delta_ab[stem + ".weight"] = (a, b)

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, key: str):
        return self.base.meta(key)

    def prefetch(self, key: str) -> None:
        self.base.prefetch(key)

    def populate(self, key: str) -> None:
        self.base.populate(key)

    def get(self, key: str) -> torch.Tensor:
        w = self.base.get(key)
        if key in self.delta_ab:
            a, b = self.delta_ab[key]
            w = (w.float() + self.scale * (b.float() @ a.float())).to(w.dtype)
        return w


def open_checkpoint(folder: str | Path, lora_base: str | Path | None = None):
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        return LoraReader(folder, lora_base)
    return FolderReader(folder)


def _dtype(name: str) -> torch.dtype:
    for dt, n in DTYPE_NAMES.items():
        if n == name:
            return dt
    raise MergeError(f"unsupported safetensors dtype {name}")


def check_compatible(readers, paths) -> list[str]:
    """Same tensor names, shapes and dtypes everywhere; else a MergeError naming the tensor."""
    first = readers[0].keys()
    ref = set(first)
    for r, p in zip(readers[1:], paths[1:]):
        other = set(r.keys())
        if other != ref:
            missing, extra = sorted(ref - other), sorted(other - ref)
            raise MergeError(f"{p}: tensors differ from {paths[0]}: missing {missing[:5]}, extra {extra[:5]}")
        for k in first:
            if r.meta(k) != readers[0].meta(k):
                raise MergeError(f"tensor {k!r}: {paths[0]} has dtype/shape {readers[0].meta(k)}, "
                                 f"{p} has {r.meta(k)}")
    return first


def plan_shards(keys, metas, max_shard_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k in keys:
        dt, shape = metas[k]
        n = _nbytes(dt, shape)
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        shards.append(cur)
    return shards


def _nbytes(dt, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dt).element_size()


class StreamingSafetensorsWriter:
    """Write one safetensors file whose header is known in advance; tensors arrive in order.

    Chunks are handed to a background thread through a small bounded queue, so writing overlaps the
    merge's arithmetic on the next chunks (both release the GIL) with memory bounded by the queue.
    """

    QUEUE = 4

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 queue_size: int = QUEUE) -> None:
        import queue
        import threading

        header, off = {}, 0
        for name, dt, shape in entries:
            n = _nbytes(dt, shape)
            header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                self.f.write(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = e

    def write_chunk(self, t: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        # a private contiguous copy only when needed; the numpy view keeps the storage alive
        self.q.put(t.contiguous().view(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self.f.close()
        if self.error is not None:
            raise self.error
