"""BEIR/TREC readers on real collections (tests/fixtures: cuts of ../shared/data); missing ids reported;
bad input named."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from qwen3train.data.collections import load_beir, load_collection, load_trec
from qwen3train.data.prepare import PrepareConfig, SourceConfig, import_collection, run_prepare

DATA = FIXTURES


@pytest.mark.parametrize("name,docs,queries,judged", [
    ("trec-dl-2019-subset", 212, 50, 43), ("dbpedia", 182, 50, 40), ("arcd", 255, 50, 50), ("vaswani", 241, 93, 93)])
def test_real_collections_load(name, docs, queries, judged):
    c = load_collection(DATA / name)
    assert len(c.corpus) == docs and len(c.queries) == queries
    assert sum(1 for r in c.qrels.values() if any(v > 0 for v in r.values())) == judged


def test_missing_ids_are_counted_not_fatal():
    c = load_collection(DATA / "arcd")
    assert c.missing["qrels_queries_absent"] > 0 and c.missing["qrels_docs_absent"] > 0
    rows, stats = import_collection(DATA / "arcd", None, None, 1, split="test")
    assert stats["qrels_docs_absent"] == c.missing["qrels_docs_absent"] and rows
    assert all(r["pos"] and r["task"] == "arcd" for r in rows)


def test_import_beir_and_trec_to_training_rows():
    rows, stats = import_collection(DATA / "trec-dl-2019-subset", "msmarco", None, 2, split="test")
    assert rows[0]["instruction"].startswith("Given a web search query")
    assert stats["rows"] + stats["queries_without_positive"] == 43  # 7 of the 50 queries have no qrels
    rows, stats = import_collection(DATA / "vaswani", None, None, 1, split="test")
    # every query is judged; the cut keeps relevant documents of 35 of them (a row needs a present positive)
    assert len(rows) == 35 and stats["rows"] + stats["queries_without_positive"] == 93 and rows[0]["query"].isupper()


def test_malformed_inputs_name_file_and_line(tmp_path):
    b = tmp_path / "beir"
    (b / "qrels").mkdir(parents=True)
    (b / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": 5}\n')
    (b / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
    (b / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:2"):
        load_beir(b)
    (b / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    (b / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d2\n")
    with pytest.raises(ValueError, match=r"test.tsv:3"):
        load_beir(b)
    t = tmp_path / "trec"
    t.mkdir()
    (t / "docs.trec").write_text("<DOC><DOCNO>1</DOCNO>text</DOC>")
    (t / "topics").write_text("<top><num>1</num><title>q</title></top>")
    (t / "qrels").write_text("1 0 1 1\n1 0 2\n")
    with pytest.raises(ValueError, match=r"qrels:2"):
        load_trec(t / "docs.trec", t / "topics", t / "qrels")


def test_mix_counts_weights_and_tasks(tmp_path):
    j = tmp_path / "syn.jsonl"
    j.write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"p{i}"], "task": "syn"}) + "\n" for i in range(10)))
    cfg = PrepareConfig(sources=[SourceConfig(path=str(DATA / "vaswani"), count=20, split="test"),
                                 SourceConfig(path=str(j), weight=1.0)], output=str(tmp_path / "mix.jsonl"))
    summary = run_prepare(cfg)
    rows = [json.loads(x) for x in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert summary["records"] == 30 == len(rows)
    assert sum(r["task"] == "vaswani" for r in rows) == 20 and sum(r["task"] == "syn" for r in rows) == 10


def test_jsonl_import_keeps_prompt_after_a_rejected_line(tmp_path):
    from qwen3train.data.prepare import import_jsonl

    f = tmp_path / "fe.jsonl"
    f.write_text('{"query": "bad", "pos": "not a list"}\n'
                 '{"query": "q", "pos": ["p"], "neg": ["n"], "prompt": "Represent this query"}\n')
    rows, stats = import_jsonl(str(f), None, None)
    assert stats["rejected"] == 1 and rows == [
        {"query": "q", "pos": ["p"], "task": "default", "neg": ["n"], "instruction": "Represent this query"}]


def test_cap_corpus_keeps_relevant_documents_and_consistent_qrels():
    """The capped collection keeps every relevant document when they fit in half the budget, fills with
    distractors up to the cap, and drops judgments of documents it removed. Catches a cap that drops
    relevant documents first (scores collapse) or keeps qrels pointing at removed documents."""
    from qwen3train.data.collections import Collection, cap_corpus

    corpus = {f"d{i}": f"text {i}" for i in range(100)}
    qrels = {"q1": {"d1": 2, "d2": 0}, "q2": {"d50": 1}, "q3": {"d99": 0}}
    col = Collection("toy", corpus, {"q1": "a", "q2": "b", "q3": "c"}, qrels)
    small = cap_corpus(col, 10)
    assert small.name == "toy@10" and len(small.corpus) == 10
    assert {"d1", "d50"} <= set(small.corpus)
    assert all(d in small.corpus for r in small.qrels.values() for d in r)
    assert cap_corpus(col, 10).corpus == small.corpus  # seeded
    assert cap_corpus(col, 0) is col and cap_corpus(col, 500) is col
    many = Collection("many", corpus, {"q": "x"}, {"q": {f"d{i}": 1 for i in range(60)}})
    capped = cap_corpus(many, 20)  # 60 relevant > half the budget: 10 relevant + 10 distractors
    assert sum(d in capped.qrels["q"] for d in capped.corpus) == 10 and len(capped.corpus) == 20


def test_prepare_stops_on_a_bad_record_or_keeps_it_with_skip(tmp_path, capsys):
    """``make prepare`` used to drop a bad JSONL record silently (a count in the summary file, nothing said,
    nothing kept), and a source that gave nothing (a collection read with too high a ``min_relevance``) was
    left out without a word. Now: the record's ``file:line`` and field stop it (``on_error=raise``, the
    default, as in training); with ``skip`` it is counted, said and kept with its reason; an empty source is
    an error naming why."""
    from qwen3train.data.records import DataError
    from qwen3train.errors import ConfigError

    f = tmp_path / "fe.jsonl"
    f.write_text('{"query": "q0", "pos": ["p0"]}\n{"query": "bad", "pos": "not a list"}\n{"query": "q2", "pos": ["p2"]}\n')
    with pytest.raises(DataError, match=r"fe.jsonl:2: field 'pos': must be a list of strings"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f))], output=str(tmp_path / "a.jsonl")))
    summary = run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f))], output=str(tmp_path / "b.jsonl"),
                                        on_error="skip"))
    assert summary["records"] == 2 and summary["sources"][0]["rejected"] == 1
    kept = [json.loads(x) for x in (tmp_path / "b_rejects.jsonl").read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["where"].endswith("fe.jsonl:2") and kept[0]["field"] == "pos"
    assert kept[0]["raw"] == '{"query": "bad", "pos": "not a list"}'
    out = capsys.readouterr().out
    assert "fe.jsonl: 2 records, 2 taken (1 rejected)" in out and "rejected records kept in" in out
    with pytest.raises(ConfigError, match=r"no records \(\d+ queries without a document judged >= min_relevance=5\)"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(DATA / "vaswani"), min_relevance=5, split="test")],
                                  output=str(tmp_path / "c.jsonl")))


def test_prepare_trains_on_a_collections_train_split_never_its_test_split_unasked(tmp_path, capsys):
    """`make prepare` read every BEIR folder's qrels/test.tsv: the README's example (BEIR msmarco, count 500,000)
    made 500,000 records of TREC-DL 2019's 43 test queries, so a model was trained on what it is evaluated on.
    Now a source reads ``split`` (default train); a folder without it, or a TREC folder (one set of
    judgments), is refused with what it holds, unless the source says ``split: test``."""
    from qwen3train.errors import ConfigError

    b = tmp_path / "beir"
    (b / "qrels").mkdir(parents=True)
    (b / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(6)))
    (b / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(6)))
    (b / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    with pytest.raises(ConfigError, match=r"beir: no qrels/train.tsv \(its splits: test\)"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(b))], output=str(tmp_path / "a.jsonl")))
    (b / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td2\t1\nq3\td3\t1\nq4\td4\t1\n")
    summary = run_prepare(PrepareConfig(sources=[SourceConfig(path=str(b), count=30)], output=str(tmp_path / "b.jsonl")))
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {r["query"] for r in rows} == {"query 2", "query 3", "query 4"}
    assert summary["sources"][0]["split"] == "train" and "beir (split train): 3 records" in capsys.readouterr().out
    rows, _ = import_collection(b, None, None, 1, split="test")
    assert {r["query"] for r in rows} == {"query 0", "query 1"}
    with pytest.raises(ConfigError, match=r"vaswani: a TREC folder holds one set of judgments"):
        import_collection(DATA / "vaswani", None, None, 1)


@pytest.mark.parametrize("name", ["arcd", "trec-dl-2019-subset", "dbpedia"])
def test_an_import_for_training_holds_only_the_judged_documents(name):
    """`make prepare` held a collection's whole corpus as text to build rows from its judged documents (BEIR
    msmarco: 8.8M passages for ~0.5M judged in train). Reading only the judged ones must leave the rows as they
    were: the same judgments, the same counts of absent ones, every judged document and query that exists."""
    from qwen3train.data.collections import _qrels

    full, judged = load_collection(DATA / name), load_collection(DATA / name, judged_only=True)
    ids = {d for r in _qrels(DATA / name / "qrels" / "test.tsv", trec=False).values() for d in r}
    assert len(judged.corpus) < len(full.corpus)  # the fixture holds unjudged documents: the filter is exercised
    assert judged.corpus == {d: t for d, t in full.corpus.items() if d in ids}
    assert judged.queries == {q: t for q, t in full.queries.items() if q in full.qrels}
    assert (judged.qrels, judged.missing) == (full.qrels, full.missing)


def _flat(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ").strip()


def _msmarco_copy(src, dst, splits=("train", "dev")):
    """A BEIR fixture written as MS MARCO distributes its files: collection.tsv (the title joined to the text,
    as a BEIR import joins it; a tab or line break inside a text, which a TSV cannot hold, as a space: see
    ``_flat``), queries.<split>.tsv, qrels.<split>.tsv (the train split in TREC's four columns with tabs, the dev
    split in BEIR's three without a header). Both splits hold the fixture's test judgments."""
    from qwen3train.data.records import join_title

    dst.mkdir()
    docs = [json.loads(x) for x in (src / "corpus.jsonl").read_text().splitlines() if x.strip()]
    (dst / "collection.tsv").write_text("".join(f"{d['_id']}\t{_flat(join_title(d.get('title'), d['text']))}\n"
                                                for d in docs))
    qs = [json.loads(x) for x in (src / "queries.jsonl").read_text().splitlines() if x.strip()]
    judged = [ln.split() for ln in (src / "qrels" / "test.tsv").read_text().splitlines() if ln.strip()]
    judged = [j for j in judged if j[-1].isdigit()]  # a header left out
    for split in splits:
        (dst / f"queries.{split}.tsv").write_text("".join(f"{q['_id']}\t{_flat(q['text'])}\n" for q in qs))
        four = split == "train"
        (dst / f"qrels.{split}.tsv").write_text("".join(f"{q}\t0\t{d}\t{r}\n" if four else f"{q} {d} {r}\n"
                                                        for q, d, r in judged))


@pytest.mark.parametrize("name", ["dbpedia", "trec-dl-2019-subset"])
def test_an_msmarco_folder_reads_as_its_beir_copy(name, tmp_path):
    """MS MARCO as distributed (collection.tsv, queries.train.tsv, qrels.train.tsv) was "neither a BEIR folder
    nor a TREC folder": the paper's stage-2 collection needed converting first. Each split of the TSV copy
    must give what the BEIR folder gives: the same documents (titles joined), queries, graded judgments and
    absent counts; the judged-only read too; a compressed collection.tsv.gz the same."""
    import gzip

    beir = load_collection(DATA / name)
    assert any("\n" in t for t in beir.corpus.values()) == (name == "dbpedia")  # the copy then differs there:
    beir.corpus = {d: _flat(t) for d, t in beir.corpus.items()}  # as flattened
    _msmarco_copy(DATA / name, tmp_path / "msmarco")
    for split in ("train", "dev"):
        got = load_collection(tmp_path / "msmarco", split)
        assert (got.corpus, got.queries, got.qrels, got.missing) == (beir.corpus, beir.queries, beir.qrels, beir.missing)
    judged = load_collection(DATA / name, judged_only=True)
    judged.corpus = {d: _flat(t) for d, t in judged.corpus.items()}
    c = tmp_path / "msmarco" / "collection.tsv"
    c.with_name("collection.tsv.gz").write_bytes(gzip.compress(c.read_bytes()))
    c.unlink()
    got = load_collection(tmp_path / "msmarco", "train", judged_only=True)
    assert (got.corpus, got.queries, got.qrels) == (judged.corpus, judged.queries, judged.qrels)
    rows, stats = import_collection(tmp_path / "msmarco", "msmarco", None, 1)  # make prepare's default: train
    assert stats["split"] == "train" and rows == [
        dict(r, pos=[_flat(p) for p in r["pos"]], **({"not_neg": [_flat(p) for p in r["not_neg"]]} if "not_neg" in r else {}))
        for r in import_collection(DATA / name, "msmarco", None, 1, split="test")[0]]


def test_an_msmarco_folder_names_its_splits_and_bad_lines(tmp_path):
    """A split it does not have is refused naming the ones it has (the default test split of `make eval`
    included: MS MARCO's is dev); a line without a tab names its file and line."""
    from qwen3train.data.collections import splits
    from qwen3train.data.records import DataError
    from qwen3train.errors import ConfigError

    m = tmp_path / "msmarco"
    _msmarco_copy(DATA / "dbpedia", m, splits=("train", "dev", "dev.small"))
    assert splits(m) == ["dev", "dev.small", "train"]
    with pytest.raises(ConfigError, match=r"msmarco: no qrels.test.tsv \(its splits: dev, dev.small, train\)"):
        load_collection(m)
    (m / "queries.dev.small.tsv").unlink()
    with pytest.raises(ConfigError, match=r"no queries.dev.small.tsv"):
        load_collection(m, "dev.small")
    lines = (m / "collection.tsv").read_text().splitlines(keepends=True)
    (m / "collection.tsv").write_text("".join(lines[:3]) + "a passage without its id\n" + "".join(lines[3:]))
    with pytest.raises(DataError, match=r"collection.tsv:4: field '<tsv>': expected 'id<TAB>text'"):
        load_collection(m, "train")


def test_a_trec_folder_reads_every_corpus_file(tmp_path):
    """A TREC collection kept in parts (corpus/a.trec, corpus/b.trec.gz) was read from its first file only: the
    other parts' documents were absent, silently, and their judgments counted as judgments of absent documents.
    Now every part, compressed or not; a DOCNO in two parts is an error naming both."""
    import gzip

    from qwen3train.data.records import DataError

    src = DATA / "vaswani"
    whole = load_collection(src)
    t = tmp_path / "vaswani"
    (t / "corpus").mkdir(parents=True)
    docs = (src / "corpus" / "doc-text.trec").read_text()
    cut = docs.index("<DOC>", len(docs) // 2)
    (t / "corpus" / "a.trec").write_text(docs[:cut])
    (t / "corpus" / "b.trec.gz").write_bytes(gzip.compress(docs[cut:].encode()))
    for f in ("query-text.trec", "qrels"):
        (t / f).write_text((src / f).read_text())
    got = load_collection(t)
    assert (got.corpus, got.queries, got.qrels, got.missing) == (whole.corpus, whole.queries, whole.qrels, whole.missing)
    (t / "corpus" / "c.trec").write_text(docs[cut:docs.index("</DOC>", cut) + 6])
    with pytest.raises(DataError, match=r"c.trec:1: field '<DOCNO>': '\d+' again \(first in b.trec.gz\)"):
        load_collection(t)


def test_an_evaluation_names_a_collections_split(tmp_path):
    """`make eval collections=[/data/msmarco@dev]`: MS MARCO (and BEIR's msmarco) are scored on their dev split;
    every collection was read at its test split. The split is named in the results; a folder whose own name
    holds '@' is still that folder."""
    from qwen3train.data.collections import load_spec, parse_spec

    m = tmp_path / "msmarco"
    _msmarco_copy(DATA / "dbpedia", m)
    (m / "qrels.dev.tsv").write_text("SemSearch_ES-2 <dbpedia:Oceanic_Airlines> 2\n")
    col = load_spec(f"{m}@dev")
    assert col.name == "msmarco@dev" and col.qrels == {"SemSearch_ES-2": {"<dbpedia:Oceanic_Airlines>": 2}}
    odd = tmp_path / "beir@2024"
    odd.symlink_to(DATA / "dbpedia")
    assert parse_spec(odd) == (odd, "test") and load_spec(odd).name == "beir@2024"
