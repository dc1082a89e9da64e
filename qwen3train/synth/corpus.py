"""Corpus reading and passage chunking.

Inputs: JSONL (``text``/``contents``/``document_text``, optional ``title``, ``language``,
``_id``/``id``/``docid``), Parquet with the same columns, TSV (``id<TAB>text``: MS MARCO's ``collection.tsv``),
plain ``.txt`` files (one document per blank-line-separated block), or a collection folder (BEIR, MS MARCO, TREC:
its documents). Each document is split into passages of at most ``max_words`` units (``overlap`` units shared
between neighbours); passages shorter than ``min_words`` units are dropped and counted.

A unit is a whitespace-separated word in scripts written with spaces and a single character in scripts
written without them (Han, kana, Thai, Lao, Khmer, Myanmar, Tibetan): a Chinese or Japanese document is
no longer one 2,000-character "word". With a tokenizer (``synth.passage_tokens``: the generator's),
units are its tokens. Passages are cut from the original text (whitespace runs collapsed to one space),
so no space is inserted between CJK characters. ``sentences`` splits after sentence punctuation of
Latin, CJK (。！？), Arabic (؟ ۔), Devanagari (। ॥), Thai-script-neutral ellipses and line breaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qwen3train.data.jsonl import iter_json_lines, plain_suffix, read_text
from qwen3train.data.records import DataError, join_title, text_hash
from qwen3train.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".md", "")


@dataclass
class Passage:
    pid: str
    text: str
    language: str
    doc_id: str


def read_documents(paths: list[Path], default_language: str, title_sep: str = ". "):
    """Yield (doc_id, text, language) in a deterministic order; bad JSON lines name file:line. A title goes
    before the text with ``title_sep`` (stage 0's prompts read ``Title. Text``; mining passes ``" "``, the
    BEIR/MTEB join that ``data.collections`` and so ``make prepare`` write)."""
    from qwen3train.data.collections import documents, read_tsv

    for path in paths:
        kind = plain_suffix(path)
        if path.is_dir():  # a collection (BEIR, MS MARCO, TREC): its documents
            yield from ((i, t, default_language) for i, t in documents(path))
            continue
        if kind in (".jsonl", ".json"):
            rows = ((f"{path}:{lineno}", f"{path.name}:{lineno}", obj) for lineno, obj in iter_json_lines(path))
        elif kind == ".parquet":
            import datasets

            rows = ((f"{path}:row {i}", f"{path.name}:{i}", obj)
                    for i, obj in enumerate(datasets.Dataset.from_parquet(str(path))))
        elif kind == ".tsv":  # id<TAB>text: MS MARCO's collection.tsv
            yield from ((i, t, default_language) for i, t in read_tsv(path))
            continue
        elif kind in TEXT_SUFFIXES:  # plain text: one document per blank-line-separated block
            blocks = read_text(path).split("\n\n")
            yield from ((f"{path.name}:{i}", b, default_language) for i, b in enumerate(blocks) if b.strip())
            continue
        else:  # a .csv read as one plain-text document was silently one huge passage
            raise ConfigError(f"{path}: a corpus file is JSONL (.jsonl), Parquet, TSV (id<TAB>text) or plain text "
                              f"({', '.join(s or 'no suffix' for s in TEXT_SUFFIXES)}), or a collection folder; "
                              f"not {kind}")
        for where, default_id, obj in rows:
            yield _document(obj, where, default_id, default_language, title_sep)


def _first(obj: dict, keys: tuple[str, ...]):
    """The first of these fields that holds something (not null, not empty: an empty text is a missing one)."""
    return next((obj[k] for k in keys if obj.get(k) not in (None, "")), None)


def _document(obj, where: str, default_id: str, default_language: str, title_sep: str):
    """(doc_id, text, language) of one JSONL line or Parquet row, the title joined before the text. Ids and
    texts by BEIR's, Pyserini's and Tevatron's names (``_id``/``id``/``docid``; ``text``/``contents``/
    ``document_text``); an id 0 is the id "0"."""
    text = _first(obj, ("text", "contents", "document_text")) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise DataError(where, "text", "missing or not a string")
    doc_id = _first(obj, ("_id", "id", "docid"))
    return (default_id if doc_id is None else str(doc_id), join_title(obj.get("title"), text, title_sep),
            obj.get("language") or default_language)


# scripts written without spaces between words: each character is a unit
NO_SPACE_CHARS = _NO_SPACE = ("\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff"
             "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f")
_UNIT = re.compile(f"[{_NO_SPACE}]|[^\\s{_NO_SPACE}]+")
_SENT_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？؟۔।॥…])\s*|\n\s*\n")
_CJK_GAP = re.compile(f"(?<=[{_NO_SPACE}\u3000-\u303f\uff00-\uffef])[^\\S\\n]*\\n\\s*(?=[{_NO_SPACE}\u3000-\u303f\uff00-\uffef])")


def _clean(text: str) -> str:
    """Whitespace runs to one space; a line break between two characters of scripts without spaces
    goes (hard-wrapped Chinese or Japanese text: not a word boundary), a space there stays."""
    return re.sub(r"\s+", " ", _CJK_GAP.sub("", text)).strip()


def unit_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each unit: a word, or one character of a script written without spaces."""
    return [m.span() for m in _UNIT.finditer(text)]


def count_units(text: str) -> int:
    return sum(1 for _ in _UNIT.finditer(text))


def _cut(text: str, start: int, end: int) -> str:
    return _clean(text[start:end])


def head(text: str, n: int) -> str:
    """The first ``n`` units of ``text``."""
    spans = unit_spans(text)
    return _cut(text, 0, spans[min(n, len(spans)) - 1][1]) if spans else ""


def sentences(text: str) -> list[str]:
    return [x for x in (_clean(p) for p in _SENT_END.split(text)) if x]


TOKEN_WINDOW = 1 << 18  # characters tokenized at a time (a fast tokenizer holds ~120 bytes per character)
_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")


def token_spans(text: str, tokenizer, window: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each token of ``text``, tokenized a window at a time: a document of 20M characters
    took +2.5 GB tokenized whole with Qwen's tokenizer, +0.4 GB by windows (the spans kept). Windows end at
    a single space between two words (the next one begins with it, as the word's token does), so the tokens
    are those of the whole text; a window with no such space in its last 4,096 characters ends where it is
    (a token there may differ)."""
    spans, start, window = [], 0, window or TOKEN_WINDOW
    while start < len(text):
        end = min(len(text), start + window)
        if end < len(text):
            gaps = [m.start() for m in _WORD_GAP.finditer(text, max(start + 1, end - 4096), end)]
            end = gaps[-1] if gaps else end
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        spans += [(a + start, b + start) for a, b in enc["offset_mapping"] if b > a]
        start = end
    return spans


def chunk(text: str, max_words: int, overlap: int, tokenizer=None) -> list[str]:
    """Passages of at most ``max_words`` units (tokens of ``tokenizer`` when given), ``overlap`` shared."""
    if tokenizer is not None:
        spans = token_spans(text, tokenizer)
    else:
        spans = unit_spans(text)
    if not spans:
        return []
    if len(spans) <= max_words:
        return [_cut(text, spans[0][0], spans[-1][1])]
    step = max(1, max_words - overlap)
    return [_cut(text, spans[s][0], spans[min(s + max_words, len(spans)) - 1][1])
            for s in range(0, max(1, len(spans) - overlap), step)]


def passages(paths: list[Path], *, max_words: int, overlap: int, min_words: int, default_language: str,
             limit: int = 0, tokenizer=None) -> tuple[list[Passage], dict]:
    """Passages of every document (``tokenizer``: sizes in its tokens, else in units, see above)."""
    out, seen, stats = [], set(), {"documents": 0, "too_short": 0, "duplicate": 0}

    def size(piece: str) -> int:
        if tokenizer is not None:
            return len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        return count_units(piece)

    for doc_id, text, lang in read_documents(paths, default_language):
        stats["documents"] += 1
        for piece in chunk(text, max_words, overlap, tokenizer):
            if size(piece) < min_words:
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
