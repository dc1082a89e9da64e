"""Checksums of what the project writes and later reads back: checkpoints and exports.

``write_manifest(folder)`` records every file under ``folder`` (size and XXH3-128 of its bytes) in
``folder/checksums.json``; ``verify(folder)`` lists what no longer matches: a missing or truncated file,
changed bytes (an interrupted copy between clusters, a full disk, bit rot). Model cards (``README.md``,
``qwen3train.json``) are left out: ``make eval`` rewrites them on purpose. A folder without a manifest
(written before manifests existed) verifies as ``None``: not verifiable, not damaged.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "checksums.json"
UNCHECKED = ("README.md", "qwen3train.json", MANIFEST)


def file_digest(path: Path, chunk: int = 8 << 20) -> str:
    from xxhash import xxh3_128

    h = xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in UNCHECKED)


def write_manifest(folder: Path) -> Path:
    """Record the files now under ``folder`` (call it when the folder is complete, before publishing it)."""
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "xxh3_128": file_digest(p)}
               for p in _files(folder)}
    path = folder / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"version": 1, "files": entries}, indent=1))
    tmp.replace(path)
    return path


def verify(folder: Path) -> list[str] | None:
    """Problems found (``"<file>: missing"``, ``"<file>: 12 bytes, 40 expected"``, ``"<file>: checksum
    differs"``, ``"checksums.json: unreadable"``); ``[]`` when every file matches; None without a manifest."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST}: unreadable"]
    problems = []
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, {want['size']} expected")
        elif file_digest(p) != want["xxh3_128"]:
            problems.append(f"{rel}: checksum differs")
    return problems


def describe(problems: list[str], limit: int = 3) -> str:
    more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
