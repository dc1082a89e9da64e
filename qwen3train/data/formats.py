"""Other tools' training data read as ours (``query``, ``pos``, ``neg``...), row by row, as it is read.

* ``tevatron``: ``query``, ``positive_passages`` and ``negative_passages``, lists of ``{docid, title, text}``
  (Tevatron's msmarco-passage, wikipedia-nq...); a passage is read as ``title text``, as a BEIR document.
* ``sentence-transformers``: by column order, as sentence-transformers trains on a dataset (its
  MultipleNegativesRankingLoss): the first column is the query (the anchor), the second the positive, every
  further one a hard negative (``negative``, or ``negative_1`` .. ``negative_n``).
* ``columns``: any other naming, ``{query: question, pos: answer, neg: [hard_1, hard_2]}`` (on top of a
  format's, or alone): each of our fields from one column or several (``neg: []``: none, for a split without
  negatives). A column of ``pos``, ``neg`` or ``not_neg`` may hold a string, a list of strings, or passages
  (``{title?, text}``); the others a string.

A row whose value cannot be read so (a passage without text, a number) is a bad record like any other: its
field is named, and ``data.on_error`` stops or skips it.
"""

from __future__ import annotations

import hashlib
import json

from qwen3train.data.records import DataError, join_title
from qwen3train.errors import ConfigError

FORMATS = ("qwen3train", "tevatron", "sentence-transformers")
LISTS = ("pos", "neg", "not_neg")
FIELDS = ("query", *LISTS, "instruction", "task", "type")
TEVATRON = {"query": ("query",), "pos": ("positive_passages",), "neg": ("negative_passages",)}


def resolve(fmt: str, columns: dict | None, names: list[str] | None, where: str):
    """The mapping (our field, its columns) of a table whose columns are ``names`` (None: not known before a
    row is read, a stream without declared features); None where the table is ours as it is."""
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    columns = dict(columns or {})
    if fmt == "qwen3train" and not columns:
        return None
    out = {}
    if fmt == "tevatron":
        out = dict(TEVATRON)
    elif fmt == "sentence-transformers":
        if not names or len(names) < 2:
            raise ConfigError(f"{where}: format sentence-transformers reads the columns in order (query, positive, "
                              f"negatives...), but its columns are {'not known before it is read' if names is None else names}: "
                              f"name them with columns: {{query: ..., pos: ..., neg: [...]}}")
        out = {"query": (names[0],), "pos": (names[1],), **({"neg": tuple(names[2:])} if names[2:] else {})}
    for key, cols in columns.items():
        if key not in FIELDS:
            raise ConfigError(f"{where}: columns.{key}: not a field of a record ({', '.join(FIELDS)})")
        cols = (cols,) if isinstance(cols, str) else tuple(cols)
        if key in LISTS and not cols and key != "pos":  # neg: [] reads none (a Tevatron split without negatives)
            out.pop(key, None)
            continue
        if not cols or (key not in LISTS and len(cols) != 1):
            raise ConfigError(f"{where}: columns.{key}: {'one column' if key not in LISTS else 'at least one column'}")
        out[key] = cols
    if "query" not in out or "pos" not in out:
        raise ConfigError(f"{where}: columns must name the query's and the positives' columns (query, pos)")
    missing = sorted({c for cols in out.values() for c in cols} - set(names)) if names is not None else []
    if missing:
        raise ConfigError(f"{where}: no column {', '.join(map(repr, missing))} (its columns: {', '.join(names)})")
    return tuple(sorted(out.items()))


def digest(mapping) -> str:
    return hashlib.sha1(json.dumps(mapping).encode()).hexdigest()[:12]


def _texts(values, where: str, key: str) -> list:
    out = []
    for col, value in values:
        for k, item in enumerate(value if isinstance(value, list) else [] if value is None else [value]):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = join_title(item.get("title"), item["text"])
            if not isinstance(item, str):
                at = f"{col}[{k}]" if isinstance(value, list) else col
                raise DataError(where, key, f"column {at} holds a {type(item).__name__}, not a text or a passage "
                                            f"({{title, text}})")
            out.append(item)
    return out


def to_ours(row: dict, mapping, where: str) -> dict:
    """One row of the other format as a record of ours (``parse_record`` then checks it as any other)."""
    if mapping is None:
        return row
    if not isinstance(row, dict):
        raise DataError(where, "<record>", f"must be an object, got {type(row).__name__}")
    out = {}
    for key, cols in mapping:
        missing = [c for c in cols if c not in row]
        if missing:
            raise DataError(where, key, f"no column {missing[0]!r} in this row")
        out[key] = _texts([(c, row[c]) for c in cols], where, key) if key in LISTS else row[cols[0]]
    return out
