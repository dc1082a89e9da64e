"""The checkpoint reader: safetensors headers parsed once, files mapped once, tensors equal to what
safetensors itself reads, damaged files refused with the file and tensor named."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3train.merge.io import FolderReader, MergeError, stream_tensors


def write(folder, sd):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.b.weight": torch.randn(7, 3, generator=g).to(torch.bfloat16),
            "model.a.weight": torch.randn(5, generator=g), "model.c.half": torch.randn(2, 2, generator=g).half(),
            "model.n": torch.tensor(3, dtype=torch.int64), "model.empty": torch.zeros(0, 4)}


def test_reader_returns_what_safetensors_reads_in_file_order(tmp_path):
    path = write(tmp_path / "m", sample())
    want = load_file(str(path))
    r = FolderReader(tmp_path / "m")
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    by_offset = sorted((*v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    assert [r.names[k] for k in r.keys()] == [k for *_, k in by_offset]
    for k in r.keys():
        got = r.get(k)
        assert got.dtype == want[r.names[k]].dtype and torch.equal(got, want[r.names[k]]), k
    streamed = dict(stream_tensors([r, FolderReader(tmp_path / "m")], r.keys()))
    assert list(streamed) == r.keys()
    assert all(torch.equal(a, b) and torch.equal(a, r.get(k)) for k, (a, b) in streamed.items())


def test_damaged_files_are_refused_naming_file_and_tensor(tmp_path):
    path = write(tmp_path / "m", sample())
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])  # truncated: the last tensor runs past the end
    with pytest.raises(MergeError, match=r"model\.safetensors: tensor '.+': offsets .* file size"):
        FolderReader(tmp_path / "m")
    path.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    with pytest.raises(MergeError, match="not a safetensors file"):
        FolderReader(tmp_path / "m")
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + b"x" + raw[9:8 + n] + raw[8 + n:])  # header JSON broken
    with pytest.raises(MergeError, match="unreadable safetensors header"):
        FolderReader(tmp_path / "m")
    header = json.loads(raw[8:8 + n])
    header["model.a.weight"]["dtype"] = "F8_E9M9"
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(MergeError, match="tensor 'model.a.weight'.*unsupported safetensors dtype F8_E9M9"):
        FolderReader(tmp_path / "m")


def test_two_names_for_one_weight_are_refused(tmp_path):
    write(tmp_path / "m", {"model.w": torch.ones(2), "w": torch.zeros(2)})
    with pytest.raises(MergeError, match="same weight"):
        FolderReader(tmp_path / "m")
