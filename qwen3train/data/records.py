"""Typed training records and their validation.

Schema (FlagEmbedding-compatible): ``{"query": str, "pos": [str, ...], "neg": [str, ...]?, "instruction": str?,
"task": str?, "type": str?, "not_neg": [str, ...]?, "pos_scores": [number, ...]?, "neg_scores": [number, ...]?}``;
FlagEmbedding's ``prompt`` is read as ``instruction`` when that is absent; the scores are a teacher's, one per
positive / negative (``loss.kd_weight``: distillation). ``not_neg``: texts that must never serve as the query's
negatives although they are not positives (``make prepare`` writes there the documents a collection judges relevant
below its ``min_relevance``; mining drops them as it drops the positives). Other keys (mining's ``pos_score``,
provenance) are ignored.
Every error names the file, the line (1-based) and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field


class DataError(ValueError):
    """A bad record: ``where`` is ``file:line``, ``field`` the offending key."""

    def __init__(self, where: str, field_name: str, message: str) -> None:
        super().__init__(f"{where}: field '{field_name}': {message}")
        self.where, self.field, self.reason = where, field_name, message


@dataclass
class Record:
    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    instruction: str | None = None
    task: str = "default"
    type: str | None = None
    not_neg: list[str] = field(default_factory=list)
    pos_scores: list[float] | None = None  # a teacher's scores of pos / neg, in their order (distillation)
    neg_scores: list[float] | None = None

    def carried(self, scores: bool = True) -> dict:
        """The optional fields a stage that rewrites records (prepare, filter, mine) passes on when set; the
        teacher's scores unless ``scores`` is False (a stage that changes the negatives: mining)."""
        keep = (("type", self.type), ("not_neg", self.not_neg))
        if scores:
            keep += (("pos_scores", self.pos_scores), ("neg_scores", self.neg_scores))
        return {k: v for k, v in keep if v}

    @property
    def has_teacher(self) -> bool:
        """A teacher scored every positive and every negative (``pos_scores``, and ``neg_scores`` if any)."""
        return self.pos_scores is not None and (self.neg_scores is not None or not self.neg)


def _text(val: str, where: str, key: str) -> str:
    """A string must be text: JSON's ``\\ud800``-style escapes can spell an unpaired surrogate, which no
    encoder, tokenizer or hash accepts later (a run would die at the batch holding it)."""
    try:
        val.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(where, key, f"holds an unpaired surrogate (U+{ord(val[e.start]):04X} at character "
                                    f"{e.start}): not text") from None
    return val


def _str_list(obj: dict, key: str, where: str, required: bool) -> list[str]:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(where, key, "missing (a list of strings is required)")
        return []
    val = obj[key]
    if isinstance(val, str):  # the classic silent bug: a string iterated as characters
        raise DataError(where, key, "must be a list of strings, got a single string")
    if not isinstance(val, list):
        raise DataError(where, key, f"must be a list of strings, got {type(val).__name__}")
    for k, item in enumerate(val):
        if not isinstance(item, str):
            raise DataError(where, f"{key}[{k}]", f"must be a string, got {type(item).__name__}")
        if not item.strip():
            raise DataError(where, f"{key}[{k}]", "is empty")
        _text(item, where, f"{key}[{k}]")
    if required and not val:
        raise DataError(where, key, "is an empty list")
    return val


def _scores(obj: dict, key: str, texts: list[str], where: str) -> list[float] | None:
    """A teacher's scores of the texts of ``key[:-7]``: finite numbers, one per text (FlagEmbedding's
    ``pos_scores``/``neg_scores``)."""
    val = obj.get(key)
    if val is None:
        return None
    if not isinstance(val, list):
        raise DataError(where, key, f"must be a list of numbers, got {type(val).__name__}")
    for k, x in enumerate(val):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise DataError(where, f"{key}[{k}]", f"must be a finite number, got {x!r}")
    if len(val) != len(texts):
        raise DataError(where, key, f"{len(val)} scores for {len(texts)} {key[:-7]} texts: one score per text")
    return [float(x) for x in val]


def _opt_str(obj: dict, key: str, where: str) -> str | None:
    val = obj.get(key)
    if val is not None and not isinstance(val, str):
        raise DataError(where, key, f"must be a string, got {type(val).__name__}")
    return val if val is None else _text(val, where, key)


def parse_record(obj, where: str) -> Record:
    """Validate one decoded JSON object / table row into a Record."""
    if not isinstance(obj, dict):
        raise DataError(where, "<record>", f"must be a JSON object, got {type(obj).__name__}")
    query = obj.get("query")
    if not isinstance(query, str):
        raise DataError(where, "query", "missing" + _format_hint(obj, where) if query is None else
                        f"must be a string, got {type(query).__name__}")
    if not query.strip():
        raise DataError(where, "query", "is empty")
    _text(query, where, "query")
    hint = _format_hint(obj, where) if obj.get("pos") is None else ""
    if hint:  # else _str_list says "missing" alone
        raise DataError(where, "pos", "missing" + hint)
    pos, neg = _str_list(obj, "pos", where, True), _str_list(obj, "neg", where, False)
    return Record(query=query, pos=pos, neg=neg,
                  instruction=_opt_str(obj, "instruction", where) or _opt_str(obj, "prompt", where), task=_opt_str(obj, "task", where) or "default",
                  type=_opt_str(obj, "type", where), not_neg=_str_list(obj, "not_neg", where, False),
                  pos_scores=_scores(obj, "pos_scores", pos, where), neg_scores=_scores(obj, "neg_scores", neg, where))


def _format_hint(obj: dict, where: str = "") -> str:
    """What a record in another tool's format needs said (its fields are ours under other names): the source that
    reads it, written out for the file at hand."""
    fmt = ("tevatron" if "positive_passages" in obj else "sentence-transformers" if "anchor" in obj or "positive" in obj
           else "ms-swift" if "messages" in obj or "positive_messages" in obj or "response" in obj else None)
    if fmt is None:
        return ""
    path, _, line = where.rpartition(":")
    f = path if path and line.isdigit() else "<the file>"
    what = {"tevatron": "Tevatron's format", "sentence-transformers": "sentence-transformers' columns",
            "ms-swift": "ms-swift's rows"}[fmt]
    return (f" ({what}: read them with format: {fmt}, as a `datasets` source: data.mixture=[{{dataset: json, "
            f"data_files: [{f}], format: {fmt}}}], or converted once by make prepare)")


def join_title(title, text: str, sep: str = " ") -> str:
    """A titled document as one text: BEIR's / MTEB's ``title text`` (evaluation, ``make prepare``, mining's
    corpus), or stage 0's ``Title. Text`` (``sep=". "``); untitled text as it is."""
    return f"{title}{sep}{text}".strip() if title else text


BOM = b"\xef\xbb\xbf"


def utf8_error(where: str, e: UnicodeDecodeError, column: int) -> "DataError":
    return DataError(where, "<utf-8>", f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {column + 1} "
                                       f"of the line: {e.reason}); save the file as UTF-8")


def decode_line(line: bytes, where: str) -> str:
    """A line's bytes as text: strict UTF-8 (no overlong forms, no encoded surrogates, no stray bytes such
    as Windows-1252's), a leading byte-order mark dropped (as JSON readers do)."""
    line = line.removeprefix(BOM)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(where, e, e.start) from None


ARRAY_HINT = ("a JSON array, not JSON Lines (one record per line): convert it once, e.g. python -c \"import json, sys; "
              "[print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]\" in.json > in.jsonl")


def json_object(line: bytes | str, where: str):
    """A line's decoded JSON value (not yet checked as a record). A file holding one JSON array (written by
    ``json.dump`` or ``to_json(lines=False)``: its first line ``[``, or the whole array on it) is named as such."""
    text = decode_line(line, where) if isinstance(line, bytes) else line
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.strip() == "[" or text.lstrip().startswith("[{") and e.msg.startswith("Expecting"):
            raise DataError(where, "<json>", ARRAY_HINT) from None
        raise DataError(where, "<json>", f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        raise DataError(where, "<json>", ARRAY_HINT)
    return obj


def parse_json_line(line: bytes | str, where: str) -> Record:
    return parse_record(json_object(line, where), where)


def text_hash(text: str) -> int:
    """Stable signed 64-bit id of a text (held-out splits and de-duplication of synthetic pairs)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def doc_hash(text: str | bytes) -> int:
    """Identity of a document in training (the identical-document rule of the loss, duplicate control in
    batch plans and streams): signed 64-bit XXH3 of its UTF-8 bytes. The record index hashes the bytes of
    Arrow's string buffers directly (``data/index.py``): the same value for the same text."""
    from xxhash import xxh3_64_intdigest

    v = xxh3_64_intdigest(text.encode("utf-8") if isinstance(text, str) else text)
    return v - (1 << 64) if v >= 1 << 63 else v


# ---- the fast path of the index build ---------------------------------------------------------------
def fast_line_parser():
    """``parse(line: bytes) -> (task, positives, has_negatives) | None`` for the index build: a typed
    msgspec decode (C) plus the checks of ``parse_record``; ``None`` sends the line to ``parse_json_line``,
    which accepts it the same way or raises the precise error. So the fast path only ever accepts what
    the slow one accepts (a test runs both over good and bad records). ``None`` without msgspec."""
    try:
        import msgspec
    except ImportError:
        return None

    class _Row(msgspec.Struct):
        query: str
        pos: list[str]
        neg: list[str] | None = None
        task: str | None = None
        instruction: str | None = None
        prompt: str | None = None
        type: str | None = None
        not_neg: list[str] | None = None
        pos_scores: list[float] | None = None
        neg_scores: list[float] | None = None

    decode = msgspec.json.Decoder(_Row).decode
    errors = (msgspec.DecodeError, msgspec.ValidationError)

    def parse(line: bytes):
        try:
            line.decode("utf-8")  # msgspec skips unknown keys without checking their bytes
            r = decode(line)
        except (UnicodeDecodeError, *errors):
            return None
        if not r.query.strip() or not r.pos or not all(s.strip() for s in (*r.pos, *(r.neg or ()), *(r.not_neg or ()))):
            return None
        for scores, texts in ((r.pos_scores, r.pos), (r.neg_scores, r.neg or ())):
            if scores is not None and (len(scores) != len(texts) or not all(map(math.isfinite, scores))):
                return None
        return r.task or "default", r.pos, bool(r.neg)

    return parse
