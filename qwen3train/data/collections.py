"""Retrieval collections: BEIR folders and TREC files -> corpus, queries and graded qrels.

BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
``qrels/<split>.tsv`` (``query-id corpus-id score``, header optional). TREC: documents
``<DOC><DOCNO>id</DOCNO>text</DOC>``, topics ``<top><num>id</num><title>text</title></top>``, qrels
``qid 0 docid rel``. JSONL is split on ``\\n`` only (texts may hold U+2028). qrels that name absent
queries are counted and dropped; those naming absent documents are counted and kept (they belong to
the ideal ranking, as in trec_eval); never an error. Malformed lines raise an error naming file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qwen3train.data.jsonl import iter_json_lines, read_text
from qwen3train.data.records import DataError, join_title
from qwen3train.errors import ConfigError


@dataclass
class Collection:
    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    missing: dict[str, int] = field(default_factory=dict)


def _qrels(path: Path, trec: bool) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
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


def load_beir(folder: str | Path, split: str = "test", judged_only: bool = False) -> Collection:
    """``judged_only``: keep only the documents and queries the split judges (what an import for training
    reads: BEIR msmarco's train split judges ~0.5M of its 8.8M passages, held as text otherwise)."""
    folder = Path(folder)
    qrels = found(folder / "qrels" / f"{split}.tsv")  # first: a wrong split is said before a large corpus is read
    if not qrels.exists():
        have = sorted({q.name.split(".")[0] for q in (folder / "qrels").glob("*.tsv*")})
        raise ConfigError(f"{folder}: no qrels/{split}.tsv (its splits: {', '.join(have) or 'none'})")
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


def load_trec(docs: str | Path, topics: str | Path, qrels: str | Path, name: str | None = None) -> Collection:
    docs, topics, qrels = Path(docs), Path(topics), Path(qrels)
    text = read_text(docs)
    corpus = {m.group(1).strip(): " ".join(m.group(2).split())
              for m in re.finditer(r"<DOC>\s*<DOCNO>(.*?)</DOCNO>(.*?)</DOC>", text, flags=re.S)}
    if not corpus:
        raise ConfigError(f"{docs}: no <DOC><DOCNO>..</DOCNO>..</DOC> records")
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
    """A BEIR folder (the judgments of ``split``: ``qrels/<split>.tsv``), or a folder with the TREC layout of
    ../shared/data/vaswani (one set of judgments: an evaluation set, read as ``split="test"`` only)."""
    p = Path(spec)
    if found(p / "corpus.jsonl").exists():
        return load_beir(p, split, judged_only)
    if split != "test":
        raise ConfigError(f"{p}: a TREC folder holds one set of judgments, an evaluation set (split: test), not "
                          f"'{split}'; to train on it anyway, say split: test for this source")
    trec_docs = sorted((p / "corpus").glob("*.trec")) if (p / "corpus").is_dir() else []
    topics = sorted(p.glob("*query*.trec")) or sorted(p.glob("*topics*"))
    if trec_docs and topics and (p / "qrels").exists():
        return load_trec(trec_docs[0], topics[0], p / "qrels", name=p.name)
    raise ConfigError(f"{p}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) nor a TREC folder")


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
