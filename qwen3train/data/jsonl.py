"""Small JSONL helpers for the project's own files (datasets go through ``data.sources``)."""

from __future__ import annotations

import json
from pathlib import Path

from qwen3train.errors import private_tmp


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSONL file, split on ``\\n`` only (texts may hold U+2028)."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").split("\n") if x.strip()]


def read_text(path: str | Path) -> str:
    """A text file's content, strict UTF-8 (a leading byte-order mark dropped); bytes that are not UTF-8
    raise DataError naming ``file:line`` instead of a decoder traceback (or silent replacement)."""
    from qwen3train.data.records import BOM, utf8_error

    data = Path(path).read_bytes().removeprefix(BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, lo = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise utf8_error(f"{path}:{line}", e, e.start - lo) from None


def iter_json_lines(path: str | Path):
    """``(line number, object)`` of each non-blank line; a line that is not JSON raises DataError naming
    ``file:line`` (the command line prints it as one line). Splits on ``\n`` only (texts may hold U+2028)."""
    from qwen3train.data.records import DataError, decode_line

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # binary lines end at b"\n" only
            line = decode_line(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}", "<json>", f"not valid JSON ({e.msg})") from None


def write_jsonl(path: str | Path, rows) -> Path:
    """Write rows atomically: a hidden temporary file renamed into place, so a kill never leaves half a file."""
    path = Path(path)
    tmp = private_tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
