"""Small JSONL helpers for the project's own files (datasets go through ``data.sources``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from qwen3train.errors import private_tmp

# compressed files read as they stream (Python's own codecs), and the command that decompresses each
COMPRESSED = {".gz": "gunzip -k", ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".zst": "unzstd", ".zstd": "unzstd"}


def plain_suffix(path: str | Path) -> str:
    """The format's suffix of a file, compressed or not: ``.jsonl`` for ``corpus.jsonl.gz``."""
    p = Path(path)
    return Path(p.stem).suffix.lower() if p.suffix.lower() in COMPRESSED else p.suffix.lower()


@contextlib.contextmanager
def open_bytes(path: str | Path):
    """A file opened for reading bytes, decompressed where its name ends in ``.gz``, ``.bz2`` or ``.xz`` (a
    BEIR collection from the hub holds ``corpus.jsonl.gz``); one that is cut short or not what its name says is
    one line naming it (a traceback before). Zstandard is refused with what to do."""
    import bz2
    import gzip
    import lzma

    from qwen3train.data.records import DataError
    from qwen3train.errors import ConfigError

    suffix = Path(path).suffix.lower()
    if suffix in (".zst", ".zstd"):
        raise ConfigError(f"{path}: Zstandard files are not read: decompress it once (unzstd {path}) or save it "
                          f"as .gz, .bz2 or .xz")
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix)
    with (opener or open)(path, "rb") as f:
        if opener is None:
            yield f
            return
        try:
            yield f
        except (EOFError, lzma.LZMAError, OSError) as e:
            raise DataError(str(path), "<file>", f"cannot be decompressed ({type(e).__name__}: {e}); a download "
                                                 f"cut short? fetch it again") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every object of a JSONL file, split on ``\\n`` only (texts may hold U+2028)."""
    return [json.loads(x) for x in read_text(path).split("\n") if x.strip()]


def read_text(path: str | Path) -> str:
    """A text file's content, strict UTF-8 (a leading byte-order mark dropped); bytes that are not UTF-8
    raise DataError naming ``file:line`` instead of a decoder traceback (or silent replacement)."""
    from qwen3train.data.records import BOM, utf8_error

    with open_bytes(path) as f:
        data = f.read().removeprefix(BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, lo = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise utf8_error(f"{path}:{line}", e, e.start - lo) from None


def iter_json_lines(path: str | Path):
    """``(line number, object)`` of each non-blank line; a line that is not JSON raises DataError naming
    ``file:line`` (the command line prints it as one line). Splits on ``\n`` only (texts may hold U+2028)."""
    from qwen3train.data.records import decode_line, json_object

    with open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):  # binary lines end at b"\n" only
            line = decode_line(raw, f"{path}:{lineno}")
            if line.strip():
                yield lineno, json_object(line, f"{path}:{lineno}")


def write_jsonl(path: str | Path, rows) -> Path:
    """Write rows atomically: a hidden temporary file renamed into place, so a kill never leaves half a file."""
    path = Path(path)
    tmp = private_tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
