"""The process group a CUDA run creates serves CPU tensors too, and every collective goes through
``qwen3train.dist`` (which puts its tensors on the communication device)."""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import torch
from torch.distributed.distributed_c10d import BackendConfig

import qwen3train
from qwen3train import dist

PACKAGE = Path(qwen3train.__file__).parent


def _device_map(spec: str) -> dict:
    return BackendConfig(torch.distributed.Backend(spec)).get_device_backend_map()


def test_cuda_process_group_has_a_cpu_backend(monkeypatch):
    """What ``dist.init()`` does on a CUDA node, with CUDA faked and the group creation captured.
    Catches the NCCL-only group (``nccl`` maps only CUDA tensors): the loop's statistics, token
    counts and object broadcasts are CPU tensors, and a multi-GPU run stopped at its first step."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", (i, len(calls))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.setdefault("init", (kw, len(calls))))
    monkeypatch.delenv("QWEN3TRAIN_DIST_BACKEND", raising=False)
    for key, val in (("WORLD_SIZE", "8"), ("RANK", "3"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(key, val)
    dist.init(timeout_min=5)
    kw, order = calls["init"]
    assert _device_map(kw["backend"]) == {"cpu": "gloo", "cuda": "nccl"}
    assert calls["set_device"] == (3, 0) and order == 1  # this rank's GPU chosen before the group exists
    assert kw["timeout"] == datetime.timedelta(minutes=5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # 2 ranks sharing one GPU (gloo): both on GPU 0
    assert dist.device_index() == 0
    # without CUDA: gloo for everything
    assert _device_map(dist.backend_spec(cuda=False))["cpu"] == "gloo"
    monkeypatch.setenv("QWEN3TRAIN_DIST_BACKEND", "nccl")  # the override is honoured
    assert dist.backend_spec(cuda=True) == "nccl"


# torch's sharding, imported by the FSDP engine only: FSDP's own collectives run on the mesh's device (the mesh is
# dist.world_mesh's), and the engine's own go through dist
SHARDING = {"train/fsdp_engine.py": ("torch.distributed.fsdp", "torch.distributed.checkpoint",
                                     "torch.distributed.checkpoint.state_dict", "torch.distributed.checkpoint.staging")}


def _uses_torch_distributed(tree: ast.AST, allowed: tuple[str, ...] = ()) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [n for n in names if n not in allowed]
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                lines.append(node.lineno)
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "distributed"
                                                                                  for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                lines.append(node.lineno)
    return lines


def test_no_collective_outside_dist_module():
    """Only ``qwen3train/dist.py`` may talk to ``torch.distributed``: a collective issued elsewhere
    would bypass the device rule (a CPU tensor handed to NCCL). Catches e.g. an engine creating its
    own process group or a stage calling ``torch.distributed.all_reduce`` on a CPU tensor."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "dist.py" and path.parent == PACKAGE:
            continue
        rel = str(path.relative_to(PACKAGE))
        lines = _uses_torch_distributed(ast.parse(path.read_text(), str(path)), SHARDING.get(rel, ()))
        if lines:
            offenders[rel] = lines
    assert not offenders, f"torch.distributed used outside qwen3train/dist.py: {offenders}"
