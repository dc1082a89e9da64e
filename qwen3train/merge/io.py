"""Reading checkpoints tensor by tensor, and writing safetensors without holding the model.

Readers accept a folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json``,
weight names with or without a ``model.`` prefix, and PEFT LoRA adapter folders (each adapted
weight is returned as ``W + (alpha / r) B A`` against the adapter's base, one tensor at a time).
The writer plans every shard's header from shapes and dtypes first, then streams each tensor's bytes
to its offset, so peak memory is one tensor (plus the merge's inputs), not a shard.
"""

from __future__ import annotations

import json
import struct
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
    """Tensors of a Hugging Face folder by canonical name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {k: self.folder / v for k, v in weight_map.items()}
        elif single.exists():
            with safe_open(single, "pt") as f:
                files = {k: single for k in f.keys()}
        else:
            raise MergeError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        self.source_folder = self.folder  # where config and tokenizer live
        self.names = {canonical(k): k for k in files}  # canonical -> stored name
        self.files = {canonical(k): p for k, p in files.items()}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for path in sorted(set(self.files.values())):
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    self._meta[canonical(k)] = (_dtype(sl.get_dtype()), tuple(sl.get_shape()))

    def keys(self) -> list[str]:
        return list(self.names)

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._meta[key]

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(self.names[key])


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
