"""Other tools' training data read as ours (``query``, ``pos``, ``neg``...), row by row, as it is read.

* ``tevatron``: ``query``, ``positive_passages`` and ``negative_passages``, lists of ``{docid, title, text}``
  (Tevatron's msmarco-passage, wikipedia-nq...); a passage is read as ``title text``, as a BEIR document.
  Tevatron's rows by document id (``query_text``, ``positive_document_ids``, ``negative_document_ids``, with a
  corpus of ``{docid, text}``) are read by ``make prepare``, which joins them with their ``corpus``.
* ``sentence-transformers``: by column order, as sentence-transformers trains on a dataset (its
  MultipleNegativesRankingLoss): the first column is the query (the anchor), the second the positive, every
  further one a hard negative (``negative``, or ``negative_1`` .. ``negative_n``).
* ``columns``: any other naming, ``{query: question, pos: answer, neg: [hard_1, hard_2]}`` (on top of a
  format's, or alone): each of our fields from one column or several (``neg: []``: none, for a split without
  negatives). A column of ``pos``, ``neg`` or ``not_neg`` may hold a string, a list of strings, or passages
  (``{title?, text}``); the others a string.

By id (``by_id``, a ``make prepare`` source with a ``corpus``): the columns of ``pos``, ``neg`` and ``not_neg``
hold document ids (strings or integers), each read as its document's text (``lookup``); an id the corpus
lacks is a bad record.

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
TEVATRON_IDS = {"query": ("query_text",), "pos": ("positive_document_ids",), "neg": ("negative_document_ids",)}
BY_ID_HINT = "make prepare joins them with their documents: give its source corpus: <the corpus they name>"


def _tevatron(names: list[str] | None, by_id: bool, where: str) -> dict:
    """Tevatron's mapping: passages inline (its datasets on the hub) or by document id (its README's layout)."""
    ids = names is not None and TEVATRON_IDS["pos"][0] in names and TEVATRON["pos"][0] not in names
    if ids and not by_id:
        raise ConfigError(f"{where}: Tevatron's rows by document id (positive_document_ids): {BY_ID_HINT}")
    if by_id and names is not None and TEVATRON["pos"][0] in names:
        raise ConfigError(f"{where}: these rows hold their passages (positive_passages), not document ids: "
                          f"read them without corpus")
    return dict(TEVATRON_IDS if by_id else TEVATRON)


def resolve(fmt: str, columns: dict | None, names: list[str] | None, where: str, by_id: bool = False):
    """The mapping (our field, its columns) of a table whose columns are ``names`` (None: not known before a
    row is read, a stream without declared features); None where the table is ours as it is. ``by_id``:
    its lists hold document ids (a ``make prepare`` source with a corpus)."""
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    columns = dict(columns or {})
    if fmt == "qwen3train" and not columns:  # ours as it is (by id too: to_ours reads its lists' ids)
        return None
    out = {}
    if fmt == "tevatron":
        out = _tevatron(names, by_id, where)
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


def _texts(values, where: str, key: str, lookup: dict | None = None) -> list:
    out = []
    for col, value in values:
        for k, item in enumerate(value if isinstance(value, list) else [] if value is None else [value]):
            if lookup is not None:
                out.append(_document(item, lookup, where, key, f"{col}[{k}]" if isinstance(value, list) else col))
                continue
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                item = join_title(item.get("title"), item["text"])
            if not isinstance(item, str):
                at = f"{col}[{k}]" if isinstance(value, list) else col
                raise DataError(where, key, f"column {at} holds a {type(item).__name__}, not a text or a passage "
                                            f"({{title, text}})")
            out.append(item)
    return out


def _document(item, lookup: dict, where: str, key: str, at: str) -> str:
    """The text of the document an id names."""
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        raise DataError(where, key, f"column {at} holds a {type(item).__name__}, not a document id")
    text = lookup.get(str(item))
    if text is None:
        raise DataError(where, key, f"document {str(item)!r} (column {at}) is not in the corpus")
    return text


def ids(row, mapping) -> list[str]:
    """The document ids a row names in its lists' columns (what the corpus must hold for it)."""
    out = []
    for key, cols in mapping or ((k, (k,)) for k in LISTS):
        for c in cols if key in LISTS and isinstance(row, dict) else ():
            value = row.get(c)
            out += [str(v) for v in (value if isinstance(value, list) else [value])
                    if isinstance(v, (str, int)) and not isinstance(v, bool)]
    return out


def to_ours(row: dict, mapping, where: str, lookup: dict | None = None) -> dict:
    """One row of the other format as a record of ours (``parse_record`` then checks it as any other);
    ``lookup``: id -> text, where the lists name documents by id."""
    if mapping is None and (lookup is None or not isinstance(row, dict)):
        return row
    if mapping is None:  # ours, its lists by id: the rest (instruction, scores...) as it is
        return row | {k: _texts([(k, row[k])], where, k, lookup) for k in LISTS if k in row}
    if not isinstance(row, dict):
        raise DataError(where, "<record>", f"must be an object, got {type(row).__name__}")
    out = {}
    for key, cols in mapping:
        missing = [c for c in cols if c not in row]
        if missing:
            hint = f" (Tevatron's rows by document id: {BY_ID_HINT})" if (
                (missing[0],) in TEVATRON.values() and TEVATRON_IDS["pos"][0] in row) else ""
            raise DataError(where, key, f"no column {missing[0]!r} in this row{hint}")
        out[key] = _texts([(c, row[c]) for c in cols], where, key, lookup) if key in LISTS else row[cols[0]]
    return out
