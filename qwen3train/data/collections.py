"""Retrieval collections: BEIR folders, MS MARCO's TSV folders and TREC files -> corpus, queries, graded qrels.

BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
``qrels/<split>.tsv`` (``query-id corpus-id score``, header optional). MS MARCO as distributed:
``collection.tsv`` (``pid<TAB>passage``), ``queries.<split>.tsv`` (``qid<TAB>query``) and ``qrels.<split>.tsv``
(``qid 0 pid rel``, or BEIR's three columns), the split being ``train``, ``dev``, ``dev.small``...
TREC: documents ``<DOC><DOCNO>id</DOCNO>text</DOC>`` (every ``*.trec`` file of ``corpus/``), topics
``<top><num>id</num><title>text</title></top>``, qrels ``qid 0 docid rel``. Any of these files may be
compressed (``.gz``, ``.bz2``, ``.xz``). JSONL is split on ``\\n`` only (texts may hold U+2028). qrels that name absent
queries are counted and dropped; those naming absent documents are counted and kept (they belong to
the ideal ranking, as in trec_eval); never an error. Malformed lines raise an error naming file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qwen3train.data.jsonl import COMPRESSED, iter_json_lines, open_bytes, read_text
from qwen3train.data.records import DataError, decode_line, join_title
from qwen3train.errors import ConfigError


@dataclass
class Collection:
    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    missing: dict[str, int] = field(default_factory=dict)


def _qrels(path: Path, trec: bool | None) -> dict[str, dict[str, int]]:
    """``trec``: ``qid 0 docid rel`` (True), BEIR's ``query-id corpus-id score`` (False), either (None: by the
    line's columns, as MS MARCO's qrels files come in both)."""
    out: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if trec is None:  # the file's first line says which
            trec = len(parts) == 4
        if not trec and lineno == 1 and not parts[-1].lstrip("-").isdigit():
            continue  # BEIR header
        if trec:
            if len(parts) != 4:
                raise DataError(f"{path}:{lineno}", "<qrels>", f"expected 'qid 0 docid rel', got {line!r}")
            qid, did, rel = parts[0], parts[2], parts[3]
        else:
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}", "<qrels>", f"expected 'query-id corpus-id score', got {line!r}")
            qid, did, rel = parts
        try:
            out.setdefault(qid, {})[did] = int(rel)
        except ValueError:
            raise DataError(f"{path}:{lineno}", "<qrels>", f"relevance {rel!r} is not an integer") from None
    return out


def _prune(c: Collection) -> Collection:
    mq = sum(1 for q in c.qrels if q not in c.queries)
    md = sum(1 for q, r in c.qrels.items() for d in r if d not in c.corpus)
    # judgments of absent documents stay (trec_eval counts them in the ideal ranking); importers skip them
    c.qrels = {q: r for q, r in c.qrels.items() if q in c.queries}
    c.missing = {"qrels_queries_absent": mq, "qrels_docs_absent": md}
    return c


def found(path: Path) -> Path:
    """``path``, or its compressed copy (``corpus.jsonl.gz``: how BEIR's collections are kept on the hub)."""
    if path.exists():
        return path
    return next((c for c in (path.with_name(path.name + z) for z in (".gz", ".bz2", ".xz")) if c.exists()), path)


def _plain_name(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix.lower() in COMPRESSED else path.name


def _glob(folder: Path, suffix: str) -> list[Path]:
    """The files of ``folder`` whose name ends in ``suffix``, compressed or not, by name."""
    return sorted(q for q in folder.glob("*") if q.is_file() and _plain_name(q).endswith(suffix))


def layout(folder: Path) -> str:
    """``beir``, ``tsv`` (MS MARCO's files), ``trec`` or ``""``."""
    if found(folder / "corpus.jsonl").exists():
        return "beir"
    if found(folder / "collection.tsv").exists():
        return "tsv"
    return "trec" if (folder / "corpus").is_dir() and _glob(folder / "corpus", ".trec") else ""


def splits(folder: str | Path) -> list[str]:
    """The splits a collection folder judges: BEIR's ``qrels/<split>.tsv``, MS MARCO's ``qrels.<split>.tsv``;
    a TREC folder has one set of judgments, read as ``test``."""
    folder = Path(folder)
    kind = layout(folder)
    if kind == "beir":
        return sorted({_plain_name(q)[:-4] for q in _glob(folder / "qrels", ".tsv")})
    if kind == "tsv":
        return sorted({_plain_name(q)[6:-4] for q in _glob(folder, ".tsv") if _plain_name(q).startswith("qrels.")})
    return ["test"] if kind == "trec" else []


def load_beir(folder: str | Path, split: str = "test", judged_only: bool = False) -> Collection:
    """``judged_only``: keep only the documents and queries the split judges (what an import for training
    reads: BEIR msmarco's train split judges ~0.5M of its 8.8M passages, held as text otherwise)."""
    folder = Path(folder)
    qrels = found(folder / "qrels" / f"{split}.tsv")  # first: a wrong split is said before a large corpus is read
    if not qrels.exists():
        raise ConfigError(f"{folder}: no qrels/{split}.tsv (its splits: {', '.join(splits(folder)) or 'none'})")
    judged = _qrels(qrels, trec=False)
    queries = {i: obj["text"] for i, obj in _by_id(folder / "queries.jsonl") if not judged_only or i in judged}
    docs = {d for r in judged.values() for d in r} if judged_only else None  # (the absent ones are counted)
    corpus = {i: join_title(obj.get("title"), obj["text"]) for i, obj in _by_id(folder / "corpus.jsonl")
              if docs is None or i in docs}
    return _prune(Collection(folder.name, corpus, queries, judged))


def _by_id(path: Path):
    """(id, object) of each line of a BEIR corpus or queries file (or its compressed copy), checked."""
    path = found(path)
    for lineno, obj in iter_json_lines(path):
        if "_id" not in obj or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{path}:{lineno}: needs '_id' and a string 'text'")
        yield str(obj["_id"]), obj


def read_tsv(path: Path, keep=None):
    """(id, text) of each line ``id<TAB>text`` of an MS MARCO file, streamed (its collection.tsv is 3 GB);
    ``keep``: only these ids. A line without a tab or an id is an error naming its line."""
    with open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, f"{path}:{lineno}").rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, text = line.partition("\t")
            if not tab or not key.strip():
                raise DataError(f"{path}:{lineno}", "<tsv>", f"expected 'id<TAB>text', got {line[:80]!r}")
            if keep is None or key.strip() in keep:
                yield key.strip(), text.strip()


def load_tsv(folder: str | Path, split: str = "test", judged_only: bool = False) -> Collection:
    """MS MARCO's layout (``collection.tsv``, ``queries.<split>.tsv``, ``qrels.<split>.tsv``)."""
    folder = Path(folder)
    qrels, qfile = found(folder / f"qrels.{split}.tsv"), found(folder / f"queries.{split}.tsv")
    if not qrels.exists() or not qfile.exists():
        missing = qrels.name if not qrels.exists() else qfile.name
        raise ConfigError(f"{folder}: no {missing} (its splits: {', '.join(splits(folder)) or 'none'})")
    judged = _qrels(qrels, trec=None)
    queries = dict(read_tsv(qfile, judged if judged_only else None))
    docs = {d for r in judged.values() for d in r} if judged_only else None
    corpus = dict(read_tsv(found(folder / "collection.tsv"), docs))
    return _prune(Collection(folder.name, corpus, queries, judged))


def trec_documents(files: list[Path]) -> dict[str, str]:
    """The ``<DOC><DOCNO>id</DOCNO>text</DOC>`` records of a collection's parts; an id twice is an error."""
    corpus, where = {}, {}
    for docs in files:
        text = read_text(docs)
        for m in re.finditer(r"<DOC>\s*<DOCNO>(.*?)</DOCNO>(.*?)</DOC>", text, flags=re.S):
            key = m.group(1).strip()
            if key in corpus:
                line = text[: m.start()].count("\n") + 1
                raise DataError(f"{docs}:{line}", "<DOCNO>", f"{key!r} again (first in {where[key]})")
            corpus[key], where[key] = " ".join(m.group(2).split()), docs.name
    if not corpus:
        raise ConfigError(f"{', '.join(map(str, files))}: no <DOC><DOCNO>..</DOCNO>..</DOC> records")
    return corpus


def documents(folder: Path):
    """(id, text) of every document of a collection folder, any layout, a title joined (``title text``), in
    its files' order: a mining or stage-0 corpus given as the collection itself (``mine.corpus=[/data/msmarco]``)."""
    kind = layout(folder)
    if kind == "beir":
        yield from ((i, join_title(obj.get("title"), obj["text"])) for i, obj in _by_id(folder / "corpus.jsonl"))
    elif kind == "tsv":
        yield from read_tsv(found(folder / "collection.tsv"))
    elif kind == "trec":
        yield from trec_documents(_glob(folder / "corpus", ".trec")).items()
    else:
        raise ConfigError(f"{folder}: a folder of documents is a collection (BEIR: corpus.jsonl; MS MARCO: "
                          f"collection.tsv; TREC: corpus/*.trec); name its files instead")


def load_trec(docs, topics: str | Path, qrels: str | Path, name: str | None = None) -> Collection:
    """``docs``: a file, or a list of files (a collection kept in parts); an id twice is an error."""
    files = [Path(d) for d in docs] if isinstance(docs, (list, tuple)) else [Path(docs)]
    topics, qrels = Path(topics), Path(qrels)
    corpus = trec_documents(files)
    ttext = read_text(topics)
    queries = {}
    for m in re.finditer(r"<top>(.*?)</top>", ttext, flags=re.S):
        num = re.search(r"<num>\s*(?:Number:)?\s*(.*?)\s*(?:</num>|\n)", m.group(1), flags=re.S)
        title = re.search(r"<title>\s*(.*?)\s*(?:</title>|<desc>|$)", m.group(1), flags=re.S)
        if not num or not title:
            line = ttext[: m.start()].count("\n") + 1
            raise ConfigError(f"{topics}:{line}: topic without <num> or <title>")
        queries[num.group(1).strip()] = " ".join(title.group(1).split())
    return _prune(Collection(name or docs.parent.name, corpus, queries, _qrels(qrels, trec=True)))


def load_collection(spec: str | Path, split: str = "test", judged_only: bool = False) -> Collection:
    """A BEIR folder (the judgments of ``split``: ``qrels/<split>.tsv``), MS MARCO's TSV folder (``qrels.<split>.tsv``),
    or a folder with the TREC layout of ../shared/data/vaswani (``corpus/*.trec``, ``*query*.trec`` or
    ``*topics*``, ``qrels``: one set of judgments, an evaluation set, read as ``split="test"`` only)."""
    p = Path(spec)
    kind = layout(p)
    if kind == "beir":
        return load_beir(p, split, judged_only)
    if kind == "tsv":
        return load_tsv(p, split, judged_only)
    if kind == "trec" and split != "test":
        raise ConfigError(f"{p}: a TREC folder holds one set of judgments, an evaluation set (split: test), not "
                          f"'{split}'; to train on it anyway, say split: test for this source")
    topics = _glob(p, ".trec")
    topics = [t for t in topics if "query" in t.name] or [t for t in sorted(p.glob("*topics*")) if t.is_file()]
    if kind == "trec" and topics and found(p / "qrels").is_file():
        return load_trec(_glob(p / "corpus", ".trec"), topics[0], found(p / "qrels"), name=p.name)
    raise ConfigError(f"{p}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), an MS MARCO folder "
                      f"(collection.tsv, queries.<split>.tsv, qrels.<split>.tsv) nor a TREC folder (corpus/*.trec, "
                      f"*query*.trec or *topics*, qrels)")


def parse_spec(spec: str | Path) -> tuple[Path, str]:
    """An evaluation's collection: ``folder`` (its test split) or ``folder@split`` (``/data/msmarco@dev``: MS
    MARCO and BEIR's msmarco are scored on their dev split). A folder whose own name holds ``@`` is itself."""
    p = Path(spec)
    head, at, split = str(spec).rpartition("@")
    if at and not p.exists() and split and "/" not in split:
        return Path(head), split
    return p, "test"


def load_spec(spec: str | Path) -> Collection:
    """``parse_spec``'s collection, named ``<folder>@<split>`` where the split is not ``test``."""
    path, split = parse_spec(spec)
    col = load_collection(path, split)
    if split != "test":
        col.name = f"{col.name}@{split}"
    return col


def cap_corpus(col: Collection, max_docs: int, seed: int = 0) -> Collection:
    """A self-consistent sub-collection of at most ``max_docs`` documents, for CPU budgets: the relevant
    documents (all of them when they fit in half the budget, else a seeded half-budget sample), then a
    seeded sample of the other documents as distractors; judgments of dropped documents are dropped too,
    so every kept query is scored against what it can find. Every system scored in one run sees the same
    sub-collection; the figures are not comparable to full-corpus ones (the name says ``@<size>``).
    0 keeps everything."""
    if max_docs <= 0 or len(col.corpus) <= max_docs:
        return col
    import random

    rng = random.Random(seed)
    all_relevant = sorted({d for r in col.qrels.values() for d, v in r.items() if v > 0 and d in col.corpus})
    relevant = all_relevant
    if len(relevant) > max_docs // 2:
        relevant = rng.sample(relevant, max_docs // 2)
    keep = set(relevant)
    others = sorted(set(col.corpus) - set(all_relevant))  # distractors: never a relevant document left out
    keep |= set(rng.sample(others, min(len(others), max_docs - len(keep))))
    corpus = {d: t for d, t in col.corpus.items() if d in keep}
    qrels = {q: {d: v for d, v in r.items() if d in keep} for q, r in col.qrels.items()}
    qrels = {q: r for q, r in qrels.items() if r}
    return Collection(f"{col.name}@{len(corpus)}", corpus, col.queries, qrels, dict(col.missing))
