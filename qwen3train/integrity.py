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


# files hashed at once: XXH3 releases the GIL, so threads overlap reading and hashing (a checkpoint's few large
# files: the engine state beside the export's weights)
HASH_THREADS = 4


def entries(folder: Path, rels: list[str], unseen_ok: bool = False) -> dict[str, dict | None]:
    """``{rel: {"size", "xxh3_128"}}`` of these files under ``folder``, hashed on up to ``HASH_THREADS`` threads.
    ``unseen_ok``: a file this process cannot find gets None (another node's disk), not FileNotFoundError."""
    from concurrent.futures import ThreadPoolExecutor

    def one(rel: str) -> dict | None:
        p = folder / rel
        try:
            return {"size": p.stat().st_size, "xxh3_128": file_digest(p)}
        except FileNotFoundError:
            if not unseen_ok:
                raise
            return None

    if len(rels) <= 1:
        return {rel: one(rel) for rel in rels}
    with ThreadPoolExecutor(min(HASH_THREADS, len(rels))) as pool:
        return dict(zip(rels, pool.map(one, rels)))


def listing(folder: Path) -> dict[str, int]:
    """The files a manifest of ``folder`` records, relative, with their sizes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in _files(folder)}


def shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """``sizes``' files dealt to ``n`` hashers by bytes (largest first, each to the least loaded), so ranks
    that hash a checkpoint together finish together whatever its files' sizes."""
    load, out = [0] * n, [[] for _ in range(n)]
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        i = load.index(min(load))
        out[i].append(rel)
        load[i] += sizes[rel]
    return out


_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _read(folder: Path) -> dict[str, dict]:
    """The entries of ``folder``'s manifest; raises one of ``_UNREADABLE`` when it is absent or malformed."""
    files = json.loads((folder / MANIFEST).read_text())["files"]
    return {rel: {"size": int(e["size"]), "xxh3_128": str(e["xxh3_128"])} for rel, e in files.items()}


def recorded(folder: Path) -> dict[str, dict]:
    """The entries ``folder``'s manifest records; {} when it has none or it is unreadable."""
    try:
        return _read(folder)
    except _UNREADABLE:
        return {}


def reusable(known: dict[str, dict], sizes: dict[str, int]) -> dict[str, dict]:
    """``known`` entries (hashed earlier by this run) of the files in ``sizes`` (a listing) still of that size."""
    return {rel: e for rel, e in known.items() if sizes.get(rel) == e["size"]}


def write_manifest(folder: Path, files: dict[str, dict] | None = None) -> Path:
    """Record the files now under ``folder`` (call it when the folder is complete, before publishing it);
    ``files``: their entries when the caller hashed them already (``entries``), else they are hashed here."""
    if files is None:
        files = entries(folder, list(listing(folder)))
    files = dict(sorted(files.items()))
    path = folder / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    tmp.replace(path)
    return path


def precheck(folder: Path) -> tuple[dict, dict, dict] | list[str] | None:
    """``verify`` up to the reading of the files: None without a manifest, ``["checksums.json: unreadable"]``,
    else (the manifest's entries, ``{rel: problem}`` of files missing or of another size, ``{rel: size}`` of the
    files left to hash)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        files = _read(folder)
    except _UNREADABLE:
        return [f"{MANIFEST}: unreadable"]
    found, present = {}, {}
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            found[rel] = "missing"
        elif p.stat().st_size != want["size"]:
            found[rel] = f"{p.stat().st_size} bytes, {want['size']} expected"
        else:
            present[rel] = want["size"]
    return files, found, present


def judged(files: dict, found: dict, got: dict) -> list[str]:
    """``verify``'s answer from ``precheck``'s entries and problems and the hashed files' ``entries``."""
    found = dict(found)
    found.update({rel: "checksum differs" for rel, e in got.items() if e["xxh3_128"] != files[rel]["xxh3_128"]})
    return [f"{rel}: {found[rel]}" for rel in files if rel in found]  # in the manifest's order


def verify(folder: Path) -> list[str] | None:
    """Problems found (``"<file>: missing"``, ``"<file>: 12 bytes, 40 expected"``, ``"<file>: checksum
    differs"``, ``"checksums.json: unreadable"``); ``[]`` when every file matches; None without a manifest."""
    pre = precheck(folder)
    if not isinstance(pre, tuple):
        return pre
    files, found, present = pre
    return judged(files, found, entries(folder, list(present)))


def describe(problems: list[str], limit: int = 3) -> str:
    more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
