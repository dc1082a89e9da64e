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

* ``ms-swift``: ms-swift's embedding and reranker rows (the route Qwen's repository points to for fine-tuning):
  ``messages`` (the query), ``positive_messages`` and ``negative_messages`` (lists of message lists: one document
  each), or its earlier ``query`` / ``response`` / ``rejected_response``. A system message of ``messages`` (or the
  earlier ``system``) is the query's instruction, written as the released models take it (``Instruct: ...\nQuery:``,
  where ms-swift's template wrote ``{system} {query}``). Refused, each as a bad record naming its field: a system
  message inside a document (an instruction for one document: ours is the query's), a conversation (more than one
  user/assistant message in a list), images, videos or audios, and a ``label`` other than 1 (ms-swift's scored or
  negative pairs, which InfoNCE and the reranker would read as positives).

* ``labeled-pairs`` (``make prepare`` only): a row per judged pair, as pointwise reranker data and
  sentence-transformers' ``labeled-pair`` output hold them: its first three columns in order (or ``columns: {query:
  ..., document: ..., label: ...}``) are the query, a document and a number (or a list of documents and a list of
  as many numbers: its ``labeled-list``); ``make prepare`` groups the rows by
  query (``prepare.labeled_records``): a document labelled ``min_relevance`` or more is a positive, 0 a negative,
  one in between ``not_neg``.

A row whose value cannot be read so (a passage without text, a number) is a bad record like any other: its
field is named, and ``data.on_error`` stops or skips it.
"""

from __future__ import annotations

import hashlib
import json

from qwen3train.data.records import DataError, join_title
from qwen3train.errors import ConfigError

FORMATS = ("qwen3train", "tevatron", "sentence-transformers", "ms-swift", "labeled-pairs")
LABELED = ("query", "document", "label")  # format labeled-pairs: a row per judged pair, grouped by make prepare
LISTS = ("pos", "neg", "not_neg")
FIELDS = ("query", *LISTS, "instruction", "task", "type")
TEVATRON = {"query": ("query",), "pos": ("positive_passages",), "neg": ("negative_passages",)}
TEVATRON_IDS = {"query": ("query_text",), "pos": ("positive_document_ids",), "neg": ("negative_document_ids",)}
BY_ID_HINT = "make prepare joins them with their documents: give its source corpus: <the corpus they name>"
SWIFT = ("messages", "positive_messages", "negative_messages")
SWIFT_EARLIER = ("query", "response", "rejected_response")
MS_SWIFT = (("ms-swift", SWIFT),)  # the mapping of format ms-swift: its rows are read by _swift_row, not by column


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
    if fmt == "labeled-pairs":
        raise ConfigError(f"{where}: format labeled-pairs holds one judged pair a row: make prepare groups them by "
                          f"query into records (a make prepare source with format: labeled-pairs)")
    if fmt == "ms-swift":
        return _swift_format(columns, names, where, by_id)
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


def _swift_format(columns: dict, names: list[str] | None, where: str, by_id: bool):
    if columns:
        raise ConfigError(f"{where}: format ms-swift reads {', '.join(SWIFT)} (or {', '.join(SWIFT_EARLIER)}): "
                          f"columns do not apply to it")
    if by_id:
        raise ConfigError(f"{where}: format ms-swift holds its documents' texts: read it without corpus")
    if names is not None and not (set(SWIFT[:2]) <= set(names) or set(SWIFT_EARLIER[:2]) <= set(names)):
        raise ConfigError(f"{where}: format ms-swift reads messages and positive_messages (or query and response), "
                          f"but its columns are {', '.join(names)}")
    return MS_SWIFT


def _swift_messages(messages, where: str, at: str, document: bool) -> tuple[str, str | None]:
    """(text, system message) of one ms-swift message list: one user or assistant message, and for a query an
    optional system message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, at, f"must be a non-empty list of messages {{role, content}}, got {messages!r:.60}")
    system, texts = None, []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(where, f"{at}[{k}]", f"must be a message {{role, content}} whose content is a string, "
                                                 f"got {m!r:.60}")
        role = m.get("role")
        if role == "system" and document:
            raise DataError(where, f"{at}[{k}]", "a system message inside a document: an instruction for one document "
                                                 "(qwen3train's instruction is the query's: the system message of "
                                                 "messages)")
        if role == "system" and system is not None:
            raise DataError(where, f"{at}[{k}]", "a second system message")
        if role not in ("system", "user", "assistant"):
            raise DataError(where, f"{at}[{k}].role", f"{role!r}: one of system, user, assistant")
        if role == "system":
            system = m["content"]
        else:
            texts.append(m["content"])
    if len(texts) != 1:
        raise DataError(where, at, f"holds {len(texts)} user/assistant messages: one text to embed "
                                   f"(a conversation is not read as one)")
    if not texts[0].strip():
        raise DataError(where, at, "its text is empty")
    return texts[0], system


def _swift_row(row, where: str) -> dict:
    """One ms-swift row as a record of ours."""
    if not isinstance(row, dict):
        raise DataError(where, "<record>", f"must be an object, got {type(row).__name__}")
    for key in (f"{side}{media}" for side in ("", "positive_", "negative_") for media in ("images", "videos", "audios")):
        if row.get(key) not in (None, [], ""):
            raise DataError(where, key, "a multimodal row: qwen3train trains text embedders and rerankers")
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or label != 1):
        raise DataError(where, "label", f"{label!r}: a scored or negative pair (ms-swift's cosine-similarity or "
                                        f"contrastive rows); InfoNCE and the reranker read positive pairs (label 1)")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(where, "system", f"must be a string, got {type(system).__name__}")
    if row.get("messages") is None:  # the earlier layout
        for key in SWIFT_EARLIER[:2]:
            if not isinstance(row.get(key), str):
                raise DataError(where, key, "missing (ms-swift's rows hold messages and positive_messages, or query "
                                            "and response)" if row.get(key) is None else "must be a string")
        neg = row.get("rejected_response")
        neg = [] if neg is None else [neg] if isinstance(neg, str) else neg
        if not isinstance(neg, list):
            raise DataError(where, "rejected_response", f"must be a string or a list of strings, got {neg!r:.60}")
        for k, text in enumerate(neg):
            if not isinstance(text, str) or not text.strip():
                raise DataError(where, f"rejected_response[{k}]", "is empty" if isinstance(text, str) else
                                f"must be a string, got {type(text).__name__}")
        for key in SWIFT_EARLIER[:2]:
            if not row[key].strip():
                raise DataError(where, key, "is empty")
        out = {"query": row["query"], "pos": [row["response"]], "neg": neg}
    else:
        query, asked = _swift_messages(row["messages"], where, "messages", False)
        if asked is not None and system is not None and asked != system:
            raise DataError(where, "system", "a system message in messages and another in system")
        system = asked if asked is not None else system
        docs = {}
        for key, required in (("positive_messages", True), ("negative_messages", False)):
            lists = row.get(key)
            if lists is None and not required:
                lists = []
            if not isinstance(lists, list) or (required and not lists):
                raise DataError(where, key, "missing" if lists is None else
                                f"must be a non-empty list of message lists, got {lists!r:.60}")
            docs[key] = [_swift_messages(m, where, f"{key}[{k}]", True)[0] for k, m in enumerate(lists)]
        out = {"query": query, "pos": docs["positive_messages"], "neg": docs["negative_messages"]}
    return out | ({"instruction": system} if system is not None and system.strip() else {})


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
    if mapping == MS_SWIFT:
        return _swift_row(row, where)
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
