"""Data of the real-backbone recipe (``make pipeline-real``): two training sources, their dev splits,
and an STS set, all offline and all independent of the evaluation collections.

Training sources (the only ones the recipe trains on):
- the stdlib docstring pairs of ``qwen3train.data.demo`` (its ``train_pairs.jsonl``; its
  ``heldout.jsonl`` stays an evaluation set), with a dev split carved from the training part;
- the English Wikipedia sample shipped in gensim's test data (206 pages of a 2017 dump, 106 of them
  articles): an article's title is the query for its lead paragraph, and "title: section" the query
  for the section's first paragraph. Articles, not pairs, are split between train and dev, so no
  dev article is seen in training. Passages of the training articles also feed stage 0.

Evaluation beside the collections: the Lee document-similarity set (Lee, Pincombe & Welsh, 2005),
also in gensim's test data: 50 news documents with the mean human similarity of each of the 1,225
pairs, scored as STS (Spearman of cosine against the human score).

    python -m qwen3train.data.real outputs/data/real [--demo outputs/data]

Nothing imports gensim's models: its Wikipedia XML reader and markup filter parse the dump.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

from qwen3train.data.jsonl import read_jsonl, write_jsonl
from qwen3train.data.records import DataError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_TASK, WIKI_INSTRUCTION = "wiki", "Given the title of a Wikipedia article or section, retrieve its opening passage"
HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
SKIP_SECTIONS = {"see also", "references", "notes", "external links", "further reading", "bibliography",
                 "sources", "citations", "footnotes"}


def gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the real-data recipe needs gensim's test data: pip install gensim")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def _clean(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def wiki_articles(path: Path | None = None) -> list[dict]:
    """-> [{"title", "sections": [(heading or "", [paragraph, ...]), ...]}] for every non-redirect page."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = path or gensim_test_data() / WIKI_FILE
    articles = []
    with bz2.BZ2File(path) as f:
        for title, text, _ in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect") or ":" in title:
                continue
            sections, heading, paras, buf = [], "", [], []
            for line in filter_wiki(text).split("\n"):
                m = HEADING.match(line)
                if m or not line.strip():
                    if buf:
                        paras.append(_clean(" ".join(buf)))
                        buf = []
                    if m:
                        sections.append((heading, paras))
                        heading, paras = m.group(2).strip(), []
                    continue
                buf.append(line)
            if buf:
                paras.append(_clean(" ".join(buf)))
            sections.append((heading, paras))
            articles.append({"title": title, "sections": sections})
    return articles


def wiki_pairs(articles: list[dict], min_words: int = 25, max_words: int = 180) -> list[dict]:
    """One pair per article lead and per content section: the first paragraph long enough to stand alone."""
    rows = []
    for art in articles:
        for heading, paras in art["sections"]:
            if heading.lower() in SKIP_SECTIONS:
                continue
            para = next((p for p in paras if len(p.split()) >= min_words), None)
            if para is None:
                continue
            query = art["title"] if not heading else f"{art['title']}: {heading}"
            rows.append({"query": query, "pos": [" ".join(para.split()[:max_words])], "task": WIKI_TASK,
                         "instruction": WIKI_INSTRUCTION, "article": art["title"]})
    return rows


def lee_sts(folder: Path | None = None) -> list[dict]:
    """The 1,225 document pairs of the Lee set with their mean human similarity (0..1)."""
    folder = folder or gensim_test_data()
    docs = [d.strip() for d in (folder / "lee.cor").read_text(encoding="utf-8", errors="replace").split("\n")
            if d.strip()]
    matrix = [[float(v) for v in line.split()] for line in (folder / "similarities0-1.txt").read_text().split("\n")
              if line.strip()]
    if len(docs) != 50 or len(matrix) != 50 or any(len(r) != 50 for r in matrix):
        raise DataError(f"{folder}: expected 50 Lee documents and a 50x50 similarity matrix, "
                        f"got {len(docs)} documents and {len(matrix)} rows")
    return [{"text1": docs[i], "text2": docs[j], "score": matrix[i][j]}
            for i in range(50) for j in range(i + 1, 50)]


def _first(pos) -> str:
    return pos if isinstance(pos, str) else pos[0]


def build(out_dir: str | Path, demo_dir: str | Path = "outputs/data", seed: int = 0, dev_fraction: float = 0.1) -> dict:
    out, demo = Path(out_dir), Path(demo_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (demo / "train_pairs.jsonl").exists():
        from qwen3train.data import demo as demo_mod

        demo_mod.build(demo)
    rng = random.Random(seed)
    # docstrings: the demo's training pairs, split into train and dev (its heldout.jsonl is evaluation)
    docs = read_jsonl(demo / "train_pairs.jsonl")
    # a method's docstring can repeat in another class (connection_lost, close, ...): the same passage
    # under another query would put a held-out evaluation passage into training, so drop those pairs
    held = {_first(d["pos"]) for d in read_jsonl(demo / "heldout.jsonl")} if (demo / "heldout.jsonl").exists() else set()
    n_docs = len(docs)
    docs = [d for d in docs if _first(d["pos"]) not in held]
    dropped_heldout = n_docs - len(docs)
    rng.shuffle(docs)
    n_dev = int(len(docs) * dev_fraction)
    docs_dev, docs_train = docs[:n_dev], docs[n_dev:]
    # Wikipedia: split by article
    articles = wiki_articles()
    titles = sorted(a["title"] for a in articles)
    rng.shuffle(titles)
    dev_titles = set(titles[: max(1, int(len(titles) * dev_fraction))])
    pairs = wiki_pairs(articles)
    wiki_train = [p for p in pairs if p["article"] not in dev_titles]
    wiki_dev = [p for p in pairs if p["article"] in dev_titles]
    # stage-0 corpus: passages of the training articles (every long paragraph) and the training docstrings
    corpus = []
    for a in articles:
        if a["title"] in dev_titles:
            continue
        for k, (heading, paras) in enumerate(a["sections"]):
            for m, p in enumerate(paras):
                if len(p.split()) >= 40 and heading.lower() not in SKIP_SECTIONS:
                    corpus.append({"_id": f"wiki:{a['title']}#{k}.{m}", "text": " ".join(p.split()[:200]),
                                   "language": "English"})
    corpus += [{"_id": f"pydoc#{i}", "text": f"{d['query']} {d['pos'][0]}", "language": "English"}
               for i, d in enumerate(docs_train)]
    rng.shuffle(corpus)
    write_jsonl(out / "train.jsonl", docs_train + wiki_train)
    write_jsonl(out / "dev.jsonl", docs_dev + wiki_dev)
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "lee_sts.jsonl", lee_sts())
    # a small dev sample for choices that score several models (the merge's fallback): half per source
    sel = rng.sample(docs_dev, min(60, len(docs_dev))) + rng.sample(wiki_dev, min(60, len(wiki_dev)))
    write_jsonl(out / "dev_select.jsonl", sel)
    stats = {"docstring_dropped_heldout_passage": dropped_heldout, "docstring_train": len(docs_train), "docstring_dev": len(docs_dev), "wiki_articles": len(articles),
             "wiki_train": len(wiki_train), "wiki_dev": len(wiki_dev), "corpus": len(corpus), "lee_sts_pairs": 1225,
             "dev_select": len(sel)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    args = sys.argv[1:]
    demo_dir = "outputs/data"
    if "--demo" in args:
        i = args.index("--demo")
        demo_dir = args[i + 1]
        del args[i:i + 2]
    print(build(args[0] if args else "outputs/data/real", demo_dir))
