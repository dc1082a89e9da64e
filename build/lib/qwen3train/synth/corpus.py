"""Corpus reading and passage chunking.

Inputs: JSONL (``text`` or ``contents``, optional ``title``, ``language``, ``_id``/``id``), Parquet
with the same columns, or plain ``.txt`` files (one document per blank-line-separated block). Each
document is split into passages of at most ``max_words`` words (``overlap`` words shared between
neighbours); passages shorter than ``min_words`` are dropped and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen3train.data.records import text_hash


@dataclass
class Passage:
    pid: str
    text: str
    language: str
    doc_id: str


def read_documents(paths: list[Path], default_language: str):
    """Yield (doc_id, text, language) in a deterministic order; bad JSON lines name file:line."""
    for path in paths:
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    text = obj.get("text") or obj.get("contents")
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field 'text': missing or not a string")
                    if obj.get("title"):
                        text = f"{obj['title']}. {text}"
                    yield str(obj.get("_id") or obj.get("id") or f"{path.name}:{lineno}"), text, \
                        obj.get("language") or default_language
        elif path.suffix == ".parquet":
            import datasets

            ds = datasets.Dataset.from_parquet(str(path))
            for row, obj in enumerate(ds):
                text = obj.get("text") or obj.get("contents") or ""
                yield str(obj.get("_id") or obj.get("id") or f"{path.name}:{row}"), text, \
                    obj.get("language") or default_language
        else:
            blocks = path.read_text(encoding="utf-8").split("\n\n")
            for i, block in enumerate(blocks):
                if block.strip():
                    yield f"{path.name}:{i}", block, default_language


def chunk(text: str, max_words: int, overlap: int) -> list[str]:
    words = text.split()
    if len(words) <= max_words:
        return [" ".join(words)]
    step = max(1, max_words - overlap)
    return [" ".join(words[s:s + max_words]) for s in range(0, max(1, len(words) - overlap), step)]


def passages(paths: list[Path], *, max_words: int, overlap: int, min_words: int, default_language: str,
             limit: int = 0) -> tuple[list[Passage], dict]:
    out, seen, stats = [], set(), {"documents": 0, "too_short": 0, "duplicate": 0}
    for doc_id, text, lang in read_documents(paths, default_language):
        stats["documents"] += 1
        for piece in chunk(text, max_words, overlap):
            if len(piece.split()) < min_words:
                stats["too_short"] += 1
                continue
            h = text_hash(piece)
            if h in seen:
                stats["duplicate"] += 1
                continue
            seen.add(h)
            out.append(Passage(pid=f"{h & 0xFFFFFFFFFFFF:012x}", text=piece, language=lang, doc_id=doc_id))
            if limit and len(out) >= limit:
                return out, stats
    return out, stats
