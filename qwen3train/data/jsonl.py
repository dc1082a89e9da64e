"""Small JSONL helpers for the project's own files (datasets go through ``data.sources``)."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSONL file, split on ``\\n`` only (texts may hold U+2028)."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").split("\n") if x.strip()]


def write_jsonl(path: str | Path, rows) -> Path:
    """Write rows atomically: a hidden temporary file renamed into place, so a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
