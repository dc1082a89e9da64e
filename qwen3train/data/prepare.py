"""Labelled-data import and mixing for stage 2 (``make prepare``).

Sources are BEIR folders, MS MARCO's TSV folders, TREC folders, or training JSONL (FlagEmbedding-style, our
own outputs: filtered synthetic pairs, mined files; another tool's format; rows naming documents by id, joined
with their ``corpus``). Each source has a task name (instruction from the registry
unless given) and either a ``weight`` or a fixed ``count``; the mix is written as one JSONL whose
records keep their ``task``, so training batches stay single-task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3train.data.collections import load_collection
from qwen3train.data.instructions import REGISTRY
from qwen3train.data.jsonl import open_bytes, read_text
from qwen3train.data.formats import FORMATS, resolve, to_ours
from qwen3train.data.records import BOM, DataError, json_object, parse_record
from qwen3train.data.sources import expand_files


@dataclass
class SourceConfig:
    path: str
    task: str | None = None
    instruction: str | None = None
    weight: float = 1.0
    count: int = 0  # exact number of records (sampled with replacement if larger than the source)
    min_relevance: int = 1  # a collection's documents judged at least this relevant are positives
    # a BEIR collection's judgments to train on: qrels/<split>.tsv. Not its test split unless said: BEIR's
    # msmarco/test.tsv is TREC-DL 2019 (43 queries), its train.tsv the 500k training queries
    split: str = "train"
    # a JSONL source in another tool's format, converted to ours (qwen3train.data.formats): tevatron,
    # sentence-transformers (keys in order: query, positive, negatives), ms-swift, and/or columns: {query: ..., pos: ...};
    # labeled-pairs: a row per judged pair (query, document, label), grouped by query (min_relevance as for collections)
    format: str = "qwen3train"
    columns: dict[str, Any] = field(default_factory=dict)
    # a JSONL source whose pos/neg name documents by id (Tevatron's positive_document_ids...): the documents,
    # a collection folder (BEIR, MS MARCO, TREC) or a corpus file (JSONL {_id|docid|id, title?, text}, id<TAB>text)
    corpus: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"prepare source {self.path}: format must be one of {FORMATS}, got {self.format!r}")
        if self.weight < 0 or self.count < 0 or self.min_relevance < 1:
            raise ValueError(f"prepare source {self.path}: weight and count must be >= 0 and min_relevance >= 1; got "
                             f"{self.weight}, {self.count}, {self.min_relevance}")


@dataclass
class PrepareConfig:
    """``on_error``: ``raise`` (a bad JSONL record stops with its ``file:line`` and field) or ``skip`` (counted,
    said, and kept with the reason in ``<output stem>_rejects.jsonl``)."""

    sources: list[SourceConfig] = field(default_factory=list)
    output: str = "outputs/prepare/stage2.jsonl"
    total: int = 0  # with weights: total records of the mix (0: every record of every source once)
    seed: int = 0
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"prepare.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.total < 0:
            raise ValueError(f"prepare.total must be >= 0, got {self.total}")
        weighted = [s for s in self.sources if not s.count]
        if self.total and weighted and sum(s.weight for s in weighted) <= 0:
            raise ValueError("prepare.total shares the records by weight: the sources without a count need a weight > 0")


def import_collection(path: str | Path, task: str | None, instruction: str | None, min_relevance: int,
                      split: str = "train"):
    """BEIR/TREC -> training rows (one per query with at least one document judged >= ``min_relevance``);
    stats. The documents judged relevant below it are the row's ``not_neg``: not positives, and never mined
    as its negatives either (a 1 on a 0-2 scale is partly relevant, not a negative)."""
    col = load_collection(path, split, judged_only=True)  # only what a row can hold: judged documents
    task = task or col.name
    instr = instruction or REGISTRY.get(task.lower())
    rows, no_pos, partial = [], 0, 0
    for qid, rels in col.qrels.items():
        pos = [col.corpus[d] for d, r in sorted(rels.items()) if r >= min_relevance and d in col.corpus]
        if not pos:
            no_pos += 1
            continue
        row = {"query": col.queries[qid], "pos": pos, "task": task}
        if instr:
            row["instruction"] = instr
        below = [col.corpus[d] for d, r in sorted(rels.items()) if 0 < r < min_relevance and d in col.corpus]
        if below:
            row["not_neg"] = below
            partial += len(below)
        rows.append(row)
    return rows, {"source": str(path), "split": split, "rows": len(rows), "queries_without_positive": no_pos,
                  "not_neg_documents": partial, **col.missing}


def _rows(path: str, fmt: str, columns: dict | None, by_id: bool):
    """(where, raw line, object or the DataError it raised, mapping) of each record of a JSONL source, or of each
    item of a file holding one JSON array (``json.dump``'s, ms-swift's ``.json`` datasets: read whole, as the
    mix is held whole anyway; an item is named ``file[i]``)."""
    for p in expand_files([path]):
        mapping, resolved = None, fmt == "qwen3train" and not columns
        for where, raw, obj in _items(p):
            if not isinstance(obj, DataError) and not resolved:  # the first object's keys are the columns, in order
                names = list(obj) if isinstance(obj, dict) else None
                mapping, resolved = resolve(fmt, columns, names, str(p), by_id), True
            yield where, raw, obj, mapping


def _items(p: Path):
    """(where, raw bytes, decoded object or the DataError it raised) of each line, or of each array item."""
    with open_bytes(p) as f:
        head = f.read(4096).lstrip().removeprefix(BOM)
    if head.startswith(b"["):
        text = read_text(p)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):  # (else JSON Lines whose first row is a list: read line by line)
                raise DataError(f"{p}:{e.lineno}", "<json>", f"not valid JSON ({e.msg} at column {e.colno})") from None
            items = None
        if isinstance(items, list):
            for i, obj in enumerate(items):
                yield f"{p}[{i}]", json.dumps(obj, ensure_ascii=False).encode(), obj
            return
    with open_bytes(p) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                where = f"{p}:{lineno}"
                try:
                    yield where, raw, json_object(raw, where)
                except DataError as e:
                    yield where, raw, e


def corpus_lookup(corpus: str, rows) -> tuple[dict[str, str], dict]:
    """id -> text of the documents the rows name (only those are held, and the rows are read again after, not
    held: a corpus of MS MARCO's 8.8M passages is read as a stream), and what was found. An id the corpus gives
    twice with two texts is an error naming it."""
    from qwen3train.data.formats import ids
    from qwen3train.errors import ConfigError
    from qwen3train.synth.corpus import read_documents

    wanted = {i for _, _, obj, mapping in rows if not isinstance(obj, DataError) for i in ids(obj, mapping)}
    lookup, read = {}, 0
    for doc_id, text, _ in read_documents(expand_files([corpus]), "English", title_sep=" "):
        read += 1
        if doc_id in wanted:
            if lookup.setdefault(doc_id, text) != text:
                raise ConfigError(f"{corpus}: document {doc_id!r} twice, with two texts")
    return lookup, {"corpus": corpus, "corpus_documents": read, "documents_named": len(wanted),
                    "documents_not_in_corpus": len(wanted - lookup.keys())}


def import_jsonl(path: str, task: str | None, instruction: str | None, on_error: str = "skip",
                 rejects: list | None = None, fmt: str = "qwen3train", columns: dict | None = None,
                 corpus: str | None = None):
    """Validated training JSONL (our schema / FlagEmbedding's; ``prompt`` is read as the instruction; another
    tool's with ``fmt``/``columns``: ``qwen3train.data.formats``; lists of document ids with ``corpus``: each
    read as its document's text). A bad record raises its ``file:line`` and field (``on_error="raise"``) or is
    counted, left out and appended to ``rejects`` with the reason (a document id the corpus lacks is one)."""
    rows, rejected, stats = [], 0, {}
    lookup = None
    if corpus is not None:  # two passes: the ids named, then those documents alone read from the corpus
        lookup, stats = corpus_lookup(corpus, _rows(path, fmt, columns, True))
    for where, raw, obj, mapping in _rows(path, fmt, columns, corpus is not None):
        try:
            if isinstance(obj, DataError):
                raise obj
            r = parse_record(to_ours(obj, mapping, where, lookup), where)
        except DataError as e:
            rejected += _rejected(e, raw, on_error, rejects)
            continue
        row = {"query": r.query, "pos": r.pos, "task": task or r.task}
        if r.neg:
            row["neg"] = r.neg
        ins = instruction or r.instruction  # FlagEmbedding's "prompt" is read as one
        if ins:
            row["instruction"] = ins
        rows.append(row | r.carried())
    return rows, {"source": path, "rows": len(rows), "rejected": rejected, **stats}


def _rejected(e: DataError, raw: bytes, on_error: str, rejects: list | None) -> int:
    """A bad record: raised (``on_error=raise``), or 1 counted and kept with its reason and raw line."""
    if on_error == "raise":
        raise e
    if rejects is not None:
        rejects.append({"where": e.where, "field": e.field, "error": e.reason,
                        "raw": raw.decode("utf-8", "replace").rstrip("\n")})
    return 1


def _labeled_row(obj, names: tuple[str, str, str] | None, where: str) -> list[tuple[str, str, float]]:
    """The judged pairs of one row: a document and its label, or (sentence-transformers' labeled-list) a list of
    documents and a list of as many labels."""
    from qwen3train.data.formats import LABELED

    if not isinstance(obj, dict):
        raise DataError(where, "<record>", f"must be a JSON object, got {type(obj).__name__}")
    query, doc, label = (obj.get(c) for c in names)
    listed = isinstance(doc, list) and isinstance(label, list)
    if listed and len(doc) != len(label):
        raise DataError(where, names[2], f"{len(label)} labels for {len(doc)} documents: one label per document")
    docs, labels = (doc, label) if listed else ([doc], [label])
    for key, col, text in (("query", names[0], query), *(("document", names[1], d) for d in docs)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(where, col, ("missing" if text is None else "is empty" if isinstance(text, str) else
                                         f"must be a string, got {type(text).__name__}") + f" (the pair's {key})")
    for y in labels:
        if isinstance(y, bool) or not isinstance(y, (int, float)) or not np.isfinite(y) or y < 0:
            raise DataError(where, names[2], f"must be a number >= 0 (the pair's {LABELED[2]}), got {y!r}")
    parse_record({"query": query, "pos": docs}, where)  # the texts checked as any record's
    return [(query, d, float(y)) for d, y in zip(docs, labels)]


def _labeled_columns(first: dict, columns: dict | None, path) -> tuple[str, str, str]:
    """The columns of query, document and label: named, or the first row's first three in order."""
    from qwen3train.data.formats import LABELED
    from qwen3train.errors import ConfigError

    order = list(first)
    names = tuple((columns or {}).get(c, order[i] if i < len(order) else None) for i, c in enumerate(LABELED))
    if None in names or not set(names) <= set(order):
        raise ConfigError(f"prepare source {path}: format labeled-pairs reads the columns {', '.join(LABELED)} "
                          f"(in this order, or named with columns: {{query: ..., document: ..., label: ...}}), but its "
                          f"first row's are {', '.join(order) or 'none'}")
    return names


def labeled_records(path: str, task: str | None, instruction: str | None, min_relevance: int, on_error: str,
                    rejects: list | None, columns: dict | None):
    """Rows of judged pairs (query, document, label) grouped by query into records: a document labelled
    ``min_relevance`` or more is a positive, 0 a negative, one in between ``not_neg`` (as a collection's
    judgments are read); a pair given twice counts at its highest label. A query without a positive gives no
    record (counted). A bad row: its ``file:line`` and column, or skipped and kept (``on_error``)."""
    from qwen3train.data.formats import LABELED
    from qwen3train.errors import ConfigError

    unknown = sorted(set(columns or {}) - set(LABELED))
    if unknown:
        raise ConfigError(f"prepare source {path}: columns.{unknown[0]}: format labeled-pairs names "
                          f"{', '.join(LABELED)}")
    groups: dict[str, dict[str, float]] = {}
    names, rejected, pairs = None, 0, 0
    for where, raw, obj, _ in _rows(path, "qwen3train", None, False):
        try:
            if isinstance(obj, DataError):
                raise obj
            if names is None and isinstance(obj, dict):  # by column order unless named
                names = _labeled_columns(obj, columns, path)
            judged = _labeled_row(obj, names or LABELED, where)
        except DataError as e:
            rejected += _rejected(e, raw, on_error, rejects)
            continue
        for query, doc, label in judged:
            pairs += 1
            docs = groups.setdefault(query, {})
            docs[doc] = max(label, docs.get(doc, label))
    instr = instruction or REGISTRY.get((task or "").lower())
    rows, no_pos, partial = [], 0, 0
    for query, docs in groups.items():
        pos = [d for d, r in docs.items() if r >= min_relevance]
        if not pos:
            no_pos += 1
            continue
        row = {"query": query, "pos": pos, "task": task or "default"}
        neg, below = [d for d, r in docs.items() if r == 0], [d for d, r in docs.items() if 0 < r < min_relevance]
        row |= ({"neg": neg} if neg else {}) | ({"not_neg": below} if below else {}) | (
            {"instruction": instr} if instr else {})
        partial += len(below)
        rows.append(row)
    return rows, {"source": path, "rows": len(rows), "pairs": pairs, "rejected": rejected,
                  "queries_without_positive": no_pos, "not_neg_documents": partial}


def run_prepare(cfg: PrepareConfig) -> dict:
    from qwen3train.errors import ConfigError, private_tmp

    rng = np.random.default_rng(cfg.seed)
    parts, report, rejects = [], [], []
    for s in cfg.sources:
        p = Path(s.path)
        if p.is_dir():
            if s.format != "qwen3train" or s.columns or s.corpus:
                raise ConfigError(f"prepare source {s.path}: format/columns/corpus read a JSONL file in another "
                                  f"tool's format or by document id, not a collection folder")
            rows, st = import_collection(p, s.task, s.instruction, s.min_relevance, s.split)
        elif s.format == "labeled-pairs":
            if s.corpus:
                raise ConfigError(f"prepare source {s.path}: format labeled-pairs holds its documents' texts: read it "
                                  f"without corpus")
            rows, st = labeled_records(s.path, s.task, s.instruction, s.min_relevance, cfg.on_error, rejects,
                                       s.columns)
        else:
            rows, st = import_jsonl(s.path, s.task, s.instruction, cfg.on_error, rejects, s.format, s.columns,
                                    s.corpus)
        if not rows:  # a source that gives nothing is a mistake in its setting, not a silent no-op
            why = (f"{st.get('queries_without_positive', 0)} queries without a document judged >= min_relevance="
                   f"{s.min_relevance}" if p.is_dir() or "pairs" in st else f"{st['rejected']} records rejected")
            raise ConfigError(f"prepare source {s.path}: no records ({why})")
        parts.append((s, rows))
        report.append(st)
    total_w = sum(s.weight for s, _ in parts if not s.count)
    mixed = []
    for (s, rows), st in zip(parts, report):
        if not rows:
            continue
        n = s.count or (round(cfg.total * s.weight / total_w) if cfg.total else len(rows))
        pick = rng.choice(len(rows), n, replace=n > len(rows)) if n != len(rows) else np.arange(len(rows))
        mixed += [rows[i] for i in pick.tolist()]
        st["taken"] = int(n)
    order = rng.permutation(len(mixed))
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(out)
    with open(tmp, "w", encoding="utf-8") as f:
        for i in order.tolist():
            f.write(json.dumps(mixed[i], ensure_ascii=False) + "\n")
    tmp.replace(out)
    summary = {"output": str(out), "records": len(mixed), "sources": report}
    rejects_file = out.with_name(out.stem + "_rejects.jsonl")
    if rejects:
        rejects_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
        summary["rejects_file"] = str(rejects_file)
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=2))
    for st in report:
        notes = [f"{st[k]} {what}" for k, what in (("pairs", "judged pairs"), ("rejected", "rejected"),
                                                   ("queries_without_positive", "queries "
                 "without positive"), ("not_neg_documents", "documents judged below min_relevance, kept as not_neg: "
                 "never mined as negatives")) if st.get(k)]
        if "corpus" in st:
            notes.append(f"{st['documents_named']} documents named by id, read from {st['corpus']} "
                         f"({st['corpus_documents']} documents), {st['documents_not_in_corpus']} not in it")
        split = f" (split {st['split']})" if "split" in st else ""
        print(f"prepare: {st['source']}{split}: {st['rows']} records, {st.get('taken', 0)} taken"
              + (f" ({', '.join(notes)})" if notes else ""), flush=True)
    print(f"prepare: {len(mixed)} records -> {out}" + (f"; rejected records kept in {rejects_file}" if rejects else ""),
          flush=True)
    return summary
