"""Other tools' training data read as ours (qwen3train.data.formats): Tevatron's passages and
sentence-transformers' column order, as `datasets` sources (indexed and streamed) and `make prepare` sources.
Before, a Tevatron or sentence-transformers dataset had to be rewritten by hand ("field 'pos': missing")."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES
from qwen3train.data.hf import StreamingSource, ref
from qwen3train.data.prepare import PrepareConfig, SourceConfig, run_prepare
from qwen3train.data.records import DataError, join_title
from qwen3train.data.sources import IndexedSource, MixtureSource
from qwen3train.errors import ConfigError

DBPEDIA = FIXTURES / "dbpedia"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dbpedia_rows():
    """(Tevatron rows, the same as our records) from the DBpedia fixture: each judged query, its documents
    judged relevant as positives and those judged 0 as negatives, as passages {docid, title, text}."""
    docs = {d["_id"]: d for d in map(json.loads, (DBPEDIA / "corpus.jsonl").read_text().splitlines()) if d}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (DBPEDIA / "queries.jsonl").read_text().splitlines())}
    judged: dict[str, dict[str, int]] = {}
    for line in (DBPEDIA / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, r = line.split("\t")
        if d in docs and q in queries:
            judged.setdefault(q, {})[d] = int(r)
    tev, ours = [], []
    for q, rels in sorted(judged.items()):
        pos = [d for d, r in sorted(rels.items()) if r >= 1]
        neg = [d for d, r in sorted(rels.items()) if r == 0]
        if not pos or not neg:
            continue
        passage = lambda d: {"docid": d, "title": docs[d].get("title", ""), "text": docs[d]["text"]}  # noqa: E731
        tev.append({"query_id": q, "query": queries[q], "positive_passages": [passage(d) for d in pos],
                    "negative_passages": [passage(d) for d in neg]})
        text = lambda d: join_title(docs[d].get("title"), docs[d]["text"])  # noqa: E731
        ours.append((queries[q], [text(d) for d in pos], [text(d) for d in neg]))
    assert len(ours) >= 8 and any(len(p) > 1 for _, p, _ in ours)  # several positives: lists kept whole
    return tev, ours


def _records(src):
    return [(r.query, r.pos, r.neg) for r in (src[i] for i in range(len(src)))]


def test_a_tevatron_dataset_reads_as_our_records_indexed_and_streamed(tmp_path):
    tev, ours = _dbpedia_rows()
    f = _write(tmp_path / "tevatron.jsonl", tev)
    m = MixtureSource(dataset="json", data_files=[str(f)], format="tevatron")
    src = IndexedSource([ref(m)], index_dir=tmp_path / "ix")
    assert _records(src) == ours
    stream = StreamingSource(m, seed=0, rank=0, world=1, shuffle_buffer=1)
    got = [(r.query, r.pos, r.neg) for _, r in stream.take(len(ours))]
    assert sorted(got) == sorted(ours)
    # the index holds the records as read: the same dataset read another way is indexed anew, not reused
    plain = MixtureSource(dataset="json", data_files=[str(f)], columns={"query": "query", "pos": "negative_passages"})
    again = IndexedSource([ref(plain)], index_dir=tmp_path / "ix")
    assert again.index_stats["built"] and again[0].pos == ours[0][2]


def test_sentence_transformers_columns_by_order_or_by_name(tmp_path):
    """ST trains on (anchor, positive, negative_1..n) by column order; (query, answer) pairs likewise."""
    rows = [{"anchor": f"q{i}", "positive": f"p{i}", "negative_1": f"n{i}a", "negative_2": f"n{i}b"} for i in range(6)]
    f = _write(tmp_path / "triplets.jsonl", rows)
    src = IndexedSource([ref(MixtureSource(dataset="json", data_files=[str(f)], format="sentence-transformers"))],
                        index_dir=tmp_path / "ix")
    assert _records(src) == [(f"q{i}", [f"p{i}"], [f"n{i}a", f"n{i}b"]) for i in range(6)]
    qa = _write(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(4)])
    m = MixtureSource(dataset="json", data_files=[str(qa)], columns={"query": "question", "pos": "answer"})
    assert _records(IndexedSource([ref(m)], index_dir=tmp_path / "ix")) == [(f"q{i}", [f"a{i}"], []) for i in range(4)]


def test_a_wrong_mapping_is_one_line_before_any_row_is_read(tmp_path):
    f = _write(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"no column 'negative_passages', 'positive_passages', 'query' \(its columns: question, answer\)"):
        ref(MixtureSource(dataset="json", data_files=[str(f)], format="tevatron"))
    with pytest.raises(ConfigError, match=r"columns.answer: not a field of a record"):
        ref(MixtureSource(dataset="json", data_files=[str(f)], columns={"query": "question", "answer": "answer"}))
    one = _write(tmp_path / "one.jsonl", [{"text": "q"}])
    with pytest.raises(ConfigError, match=r"reads the columns in order .* its columns are \['text'\]"):
        ref(MixtureSource(dataset="json", data_files=[str(one)], format="sentence-transformers"))
    no_neg = _write(tmp_path / "dev.jsonl", [{"query": "q", "positive_passages": [{"docid": "1", "text": "p"}]}])
    got = IndexedSource([ref(MixtureSource(dataset="json", data_files=[str(no_neg)], format="tevatron",
                                           columns={"neg": []}))], index_dir=tmp_path / "ix")
    assert _records(got) == [("q", ["p"], [])]  # a Tevatron split without negative_passages, read with neg: []
    with pytest.raises(ValueError, match=r"format/columns read a `datasets` source"):
        MixtureSource(files=[str(f)], format="tevatron")


def test_a_row_that_cannot_be_read_so_is_a_bad_record_like_any_other(tmp_path):
    """A passage without text: its row and field named (raise), or counted and kept as a reject (skip)."""
    tev, ours = _dbpedia_rows()
    tev[2]["positive_passages"][0] = {"docid": "x", "title": "no text"}
    f = _write(tmp_path / "tevatron.jsonl", tev)
    m = MixtureSource(dataset="json", data_files=[str(f)], format="tevatron")
    with pytest.raises(DataError, match=r"row 3: field 'pos': column positive_passages\[0\] holds a dict"):
        IndexedSource([ref(m)], index_dir=tmp_path / "ix")
    src = IndexedSource([ref(m)], index_dir=tmp_path / "ix2", on_error="skip", rejects_path=tmp_path / "rej.jsonl")
    assert _records(src) == ours[:2] + ours[3:]
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and rej[0]["field"] == "pos"


def test_make_prepare_converts_a_file_in_another_format(tmp_path):
    tev, ours = _dbpedia_rows()
    f = _write(tmp_path / "tevatron.jsonl", tev)
    st = _write(tmp_path / "st.jsonl", [{"anchor": q, "positive": p[0], "negative": n[0]} for q, p, n in ours])
    run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), task="dbp", format="tevatron"),
                                       SourceConfig(path=str(st), task="st", format="sentence-transformers")],
                              output=str(tmp_path / "mix.jsonl")))
    rows = [json.loads(x) for x in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert sorted((r["query"], r["pos"], r["neg"]) for r in rows if r["task"] == "dbp") == sorted(ours)
    assert sorted((r["query"], r["pos"], r["neg"]) for r in rows if r["task"] == "st") == \
        sorted((q, p[:1], n[:1]) for q, p, n in ours)


def test_a_record_of_another_format_says_how_to_read_it(tmp_path):
    """Given as training JSONL, a Tevatron or sentence-transformers row was "field 'pos': missing" alone."""
    from qwen3train.data.records import parse_record

    tev, _ = _dbpedia_rows()
    with pytest.raises(DataError, match=r"field 'pos': missing \(Tevatron's format: read them with format: tevatron, as a "
                                        r"`datasets` source: data.mixture=\[\{dataset: json, data_files: \[f\], "
                                        r"format: tevatron\}\], or converted once by make prepare\)$"):
        parse_record(tev[0], "f:1")
    with pytest.raises(DataError, match=r"field 'query': missing \(sentence-transformers' columns"):
        parse_record({"anchor": "q", "positive": "p"}, "f:1")
    with pytest.raises(DataError, match=r"field 'pos': missing \(a list of strings is required\)$"):
        parse_record({"query": "q"}, "f:1")


def _by_id(tev):
    """Tevatron's README layout of the same rows: ids in the rows, the texts in a corpus of {docid, title, text}."""
    rows = [{"query_id": r["query_id"], "query_text": r["query"],
             "positive_document_ids": [p["docid"] for p in r["positive_passages"]],
             "negative_document_ids": [p["docid"] for p in r["negative_passages"]]} for r in tev]
    docs = {p["docid"]: p for r in tev for p in r["positive_passages"] + r["negative_passages"]}
    return rows, [docs[d] for d in sorted(docs)]


def test_make_prepare_joins_rows_by_document_id_with_their_corpus(tmp_path):
    """Tevatron's README format (and ours with ids in pos/neg): before, no reader took it; `format: tevatron`
    wanted positive_passages. The corpus may be a corpus file or the collection folder itself."""
    tev, ours = _dbpedia_rows()
    rows, corpus = _by_id(tev)
    f = _write(tmp_path / "train.jsonl", rows)
    c = _write(tmp_path / "corpus.jsonl", corpus + [{"docid": "unnamed", "text": "a document no row names"}])
    ids_ours = _write(tmp_path / "ours.jsonl", [{"query": r["query_text"], "pos": r["positive_document_ids"],
                                                 "neg": r["negative_document_ids"], "task": "x"} for r in rows])
    out = tmp_path / "mix.jsonl"
    summary = run_prepare(PrepareConfig(sources=[
        SourceConfig(path=str(f), task="tev", format="tevatron", corpus=str(c)),
        SourceConfig(path=str(ids_ours), task="ours", corpus=str(DBPEDIA))], output=str(out)))
    got = [json.loads(x) for x in out.read_text().splitlines()]
    for task in ("tev", "ours"):
        assert sorted((r["query"], r["pos"], r["neg"]) for r in got if r["task"] == task) == sorted(ours)
    tev_stats = summary["sources"][0]
    assert tev_stats["documents_named"] == len(corpus) and tev_stats["corpus_documents"] == len(corpus) + 1
    assert tev_stats["documents_not_in_corpus"] == 0


def test_a_document_id_the_corpus_lacks_is_a_bad_record(tmp_path):
    tev, ours = _dbpedia_rows()
    rows, corpus = _by_id(tev)
    rows[1]["negative_document_ids"].append("lost-42")
    f, c = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "corpus.jsonl", corpus)
    src = SourceConfig(path=str(f), format="tevatron", corpus=str(c))
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'neg': document 'lost-42' "
                                        r"\(column negative_document_ids\[\d+\]\) is not in the corpus"):
        run_prepare(PrepareConfig(sources=[src], output=str(tmp_path / "a.jsonl")))
    summary = run_prepare(PrepareConfig(sources=[src], output=str(tmp_path / "b.jsonl"), on_error="skip"))
    assert summary["records"] == len(ours) - 1 and summary["sources"][0]["documents_not_in_corpus"] == 1
    rej = [json.loads(x) for x in (tmp_path / "b_rejects.jsonl").read_text().splitlines()]
    assert [r["field"] for r in rej] == ["neg"] and "lost-42" in rej[0]["raw"]


def test_rows_by_id_without_a_corpus_and_a_corpus_that_disagrees_are_refused(tmp_path):
    tev, _ = _dbpedia_rows()
    rows, corpus = _by_id(tev)
    f, c = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "corpus.jsonl", corpus)
    out = str(tmp_path / "o.jsonl")
    by_id = r"Tevatron's rows by document id \(positive_document_ids\): make prepare joins them .* corpus:"
    with pytest.raises(ConfigError, match=by_id):  # read as passages, every row was "no column positive_passages"
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), format="tevatron")], output=out))
    with pytest.raises(ConfigError, match=by_id):
        ref(MixtureSource(dataset="json", data_files=[str(f)], format="tevatron"))
    from qwen3train.data.formats import resolve, to_ours

    with pytest.raises(DataError, match=r"no column '\w+_passages' in this row \(Tevatron's rows by document id"):
        to_ours(rows[0], resolve("tevatron", None, None, "stream"), "stream:1")  # a stream's columns known late
    inline = _write(tmp_path / "inline.jsonl", tev)
    with pytest.raises(ConfigError, match=r"hold their passages \(positive_passages\), not document ids"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(inline), format="tevatron", corpus=str(c))],
                                  output=out))
    neither = _write(tmp_path / "qa.jsonl", [{"question": "q", "answer": "1"}])  # a wrong file: its columns named
    with pytest.raises(ConfigError, match=r"no column 'negative_document_ids', 'positive_document_ids', 'query_text' "
                                          r"\(its columns: question, answer\)"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(neither), format="tevatron", corpus=str(c))],
                                  output=out))
    twice = _write(tmp_path / "twice.jsonl", corpus + [dict(corpus[0], text="another text")])
    with pytest.raises(ConfigError, match=rf"document {corpus[0]['docid']!r} twice, with two texts"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), format="tevatron", corpus=str(twice))],
                                  output=out))


def _swift_rows(tev):
    """ms-swift's rows of the same records: its current layout (messages, positive_messages, negative_messages; the
    documents as user or assistant messages, as its embedding and reranker docs write them; a system message on
    every third row) and, every fourth row, its earlier one (query, response, rejected_response, system)."""
    rows, ours = [], []
    for i, r in enumerate(tev):
        text = lambda p: join_title(p.get("title"), p["text"])  # noqa: E731
        q, pos, neg = r["query"], [text(p) for p in r["positive_passages"]], [text(p) for p in r["negative_passages"]]
        ins = f"Given an entity question {i}, retrieve its Wikipedia abstract" if i % 3 == 0 else None
        if i % 4 == 3:  # the earlier layout: one positive
            rows.append({"query": q, "response": pos[0], "rejected_response": neg, **({"system": ins} if ins else {})})
            pos = pos[:1]
        else:
            role = "assistant" if i % 2 else "user"
            rows.append({"messages": ([{"role": "system", "content": ins}] if ins else []) + [{"role": "user", "content": q}],
                         "positive_messages": [[{"role": role, "content": p}] for p in pos],
                         **({"negative_messages": [[{"role": role, "content": n}] for n in neg]} if i % 5 else {})})
            neg = neg if i % 5 else []
        ours.append((q, pos, neg, ins))
    return rows, ours


def test_ms_swift_rows_read_as_ours_with_the_system_message_as_the_instruction(tmp_path):
    """ms-swift's embedding/reranker rows (the fine-tuning route Qwen's repository points to) in both its layouts,
    indexed, streamed and through make prepare: the query's system message is the record's instruction (so it is
    written as the released models take it, not ms-swift's "{system} {query}"); an assistant document is a document.
    Before, such a file was "field 'query': missing" with no way to read it but a rewrite by hand."""
    tev, _ = _dbpedia_rows()
    rows, ours = _swift_rows(tev)
    assert any(o[3] for o in ours) and any(len(o[1]) > 1 for o in ours) and any(not o[2] for o in ours)
    f = _write(tmp_path / "swift.jsonl", rows)
    m = MixtureSource(dataset="json", data_files=[str(f)], format="ms-swift")
    src = IndexedSource([ref(m)], index_dir=tmp_path / "ix")
    assert [(r.query, r.pos, r.neg, r.instruction) for r in (src[i] for i in range(len(src)))] == ours
    stream = StreamingSource(m, seed=0, rank=0, world=1, shuffle_buffer=1)
    assert sorted((r.query, r.pos, r.neg, r.instruction or "") for _, r in stream.take(len(ours))) == \
        sorted((q, p, n, i or "") for q, p, n, i in ours)
    run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), task="swift", format="ms-swift")],
                              output=str(tmp_path / "mix.jsonl")))
    got = [json.loads(x) for x in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert sorted((r["query"], r["pos"], r.get("neg", []), r.get("instruction", "")) for r in got) == \
        sorted((q, p, n, i or "") for q, p, n, i in ours)


@pytest.mark.parametrize("change,field,message", [
    (lambda r: r | {"images": ["/a.jpg"]}, "images", "a multimodal row"),
    (lambda r: r | {"negative_images": [["/a.jpg"]]}, "negative_images", "a multimodal row"),
    (lambda r: r | {"label": 0}, "label", r"0: a scored or negative pair"),
    (lambda r: r | {"label": 0.8}, "label", r"0.8: a scored or negative pair"),
    (lambda r: r | {"positive_messages": [[{"role": "system", "content": "x"}, {"role": "user", "content": "d"}]]},
     r"positive_messages\[0\]\[0\]", "a system message inside a document"),
    (lambda r: r | {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}]}, "messages", "holds 3 user/assistant messages"),
    (lambda r: r | {"messages": [{"role": "tool", "content": "a"}]}, r"messages\[0\].role", "'tool': one of system"),
    (lambda r: r | {"messages": [{"role": "user", "content": ["a"]}]}, r"messages\[0\]", "whose content is a string"),
    (lambda r: r | {"negative_messages": [[{"role": "user", "content": "  "}]]}, r"negative_messages\[0\]",
     "its text is empty"),
    (lambda r: {k: v for k, v in r.items() if k != "positive_messages"}, "positive_messages", "missing"),
    (lambda r: {"query": "q", "rejected_response": ["n"]}, "response", r"missing \(ms-swift's rows hold"),
    (lambda r: {"query": "q", "response": "p", "rejected_response": ["n", 3]}, r"rejected_response\[1\]",
     "must be a string, got int"),
    (lambda r: {"query": " ", "response": "p"}, "query", "is empty"),
])
def test_an_ms_swift_row_it_cannot_read_is_a_bad_record_naming_its_field(tmp_path, change, field, message):
    """What ms-swift's rows can hold that an InfoNCE or reranker record cannot: each one line naming the row and
    the field (raise), or counted and kept as a reject (skip). A label-0 pair read as a positive, or a
    document's own instruction dropped, would train on something else than the file says, silently."""
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}],
             "positive_messages": [[{"role": "user", "content": f"p{i}"}]]} for i in range(4)]
    rows[2] = change(rows[2])
    f = _write(tmp_path / "swift.jsonl", rows)
    m = MixtureSource(dataset="json", data_files=[str(f)], format="ms-swift")
    with pytest.raises(DataError, match=rf"row 3: field '{field}': (.* )?{message}"):
        IndexedSource([ref(m)], index_dir=tmp_path / "ix")
    src = IndexedSource([ref(m)], index_dir=tmp_path / "ix2", on_error="skip", rejects_path=tmp_path / "rej.jsonl")
    assert [src[i].query for i in range(len(src))] == ["q0", "q1", "q3"]
    rej = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert len(rej) == 1 and rej[0]["field"] == field.replace("\\", "")


def test_ms_swift_format_is_refused_where_it_cannot_apply(tmp_path):
    """Columns or a corpus with format ms-swift, and a file that is not ms-swift's: one line before any row is read;
    an ms-swift row given as our JSONL says how to read it."""
    from qwen3train.data.records import parse_record

    ours = _write(tmp_path / "ours.jsonl", [{"query": "q", "pos": ["p"]}])
    with pytest.raises(ConfigError, match=r"format ms-swift reads messages and positive_messages \(or query and "
                                          r"response\), but its columns are query, pos"):
        ref(MixtureSource(dataset="json", data_files=[str(ours)], format="ms-swift"))
    swift = _write(tmp_path / "swift.jsonl", [{"messages": [{"role": "user", "content": "q"}],
                                               "positive_messages": [[{"role": "user", "content": "p"}]]}])
    with pytest.raises(ConfigError, match=r"format ms-swift reads .*: columns do not apply to it"):
        ref(MixtureSource(dataset="json", data_files=[str(swift)], format="ms-swift", columns={"query": "messages"}))
    with pytest.raises(ConfigError, match=r"format ms-swift holds its documents' texts: read it without corpus"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(swift), format="ms-swift", corpus=str(DBPEDIA))],
                                  output=str(tmp_path / "o.jsonl")))
    row = json.loads(swift.read_text())
    with pytest.raises(DataError, match=r"field 'query': missing \(ms-swift's rows: read them with format: ms-swift"):
        parse_record(row, "f:1")
    with pytest.raises(DataError, match=r"field 'pos': missing \(ms-swift's rows: read them with format: ms-swift"):
        parse_record({"query": "q", "response": "p"}, "f:1")


def test_stage1_on_ms_swift_rows_trains_as_on_the_same_records_of_ours(tiny_model_dir, tmp_path):
    """A run on ms-swift's rows (a `datasets` source, format ms-swift) takes the same steps as a run on the same
    records in our format: the instruction of a system message reaches the query's text as ours does (a query
    embedded without it, or as ms-swift's "{system} {query}", gives other losses from the first step)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs, train_cfg

    from qwen3train.train.loop import run

    ours = [json.loads(x) for x in make_pairs(tmp_path / "d.jsonl", n=16, k=2).read_text().splitlines()]
    swift = []
    for i, r in enumerate(ours):
        r.pop("task")
        if i % 2:
            r["instruction"] = f"Given a riddle {i}, find its answer"
        swift.append({"messages": ([{"role": "system", "content": r["instruction"]}] if i % 2 else []) +
                      [{"role": "user", "content": r["query"]}],
                      "positive_messages": [[{"role": "user", "content": p}] for p in r["pos"]],
                      "negative_messages": [[{"role": "user", "content": n}] for n in r["neg"]]})
    curves = {}
    for name, rows, fmt in (("ours", ours, "qwen3train"), ("swift", swift, "ms-swift"),
                            ("plain", [{k: v for k, v in r.items() if k != "instruction"} for r in ours], "qwen3train")):
        f = _write(tmp_path / f"{name}.jsonl", rows)
        cfg = train_cfg(tiny_model_dir, f, tmp_path / name, max_steps=3)
        cfg.data.train_files = []
        cfg.data.mixture = [MixtureSource(dataset="json", data_files=[str(f)], format=fmt)]
        out = run(cfg)
        curves[name] = [m["loss"] for m in map(json.loads, (out.parent / "metrics.jsonl").read_text().splitlines())
                        if "loss" in m]
    assert len(curves["ours"]) == 3 and curves["swift"] == curves["ours"], curves
    assert curves["plain"][0] != curves["ours"][0], curves  # the instructions change the loss: the check can fail


def test_make_prepare_groups_labeled_pairs_by_query_as_a_collection_reads_its_judgments(tmp_path):
    """A row per judged pair (pointwise reranker data, sentence-transformers' labeled-pair output): the DBpedia
    fixture's graded judgments written as such rows, in shuffled order, give the records its collection gives
    (positives at >= min_relevance, the documents judged below it as not_neg), plus its documents judged 0 as
    negatives. Before, such a file could not be read at all (each row a query with one document and no label)."""
    from qwen3train.data.prepare import import_collection

    docs = {d["_id"]: d for d in map(json.loads, (DBPEDIA / "corpus.jsonl").read_text().splitlines()) if d}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (DBPEDIA / "queries.jsonl").read_text().splitlines())}
    text = {i: join_title(d.get("title"), d["text"]) for i, d in docs.items()}
    judged = [line.split("\t") for line in (DBPEDIA / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    judged = [(q, d, int(r)) for q, d, r in judged if q in queries and d in docs]
    rng = __import__("random").Random(0)
    rows = [{"question": queries[q], "passage": text[d], "score": r} for q, d, r in judged]
    rng.shuffle(rows)
    f = _write(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "mix.jsonl"
    summary = run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), task="dbpedia", format="labeled-pairs",
                                                              min_relevance=2)], output=str(out)))
    got = {r["query"]: r for r in map(json.loads, out.read_text().splitlines())}
    want, _ = import_collection(DBPEDIA, "dbpedia", None, 2, split="test")
    assert len(got) == len(want) and summary["sources"][0]["pairs"] == len(rows)
    assert any(r.get("not_neg") for r in want) and any(r.get("neg") for r in got.values())
    for w in want:
        g = got[w["query"]]
        assert sorted(g["pos"]) == sorted(w["pos"]) and sorted(g.get("not_neg", [])) == sorted(w.get("not_neg", []))
        zero = sorted(text[d] for q, d, r in judged if queries[q] == w["query"] and r == 0)
        assert sorted(g.get("neg", [])) == zero
        assert g["instruction"] == w["instruction"] and g["task"] == "dbpedia"
    # named columns read the same rows in another column order
    f2 = _write(tmp_path / "named.jsonl", [{"score": r["score"], "passage": r["passage"], "question": r["question"]}
                                           for r in rows])
    run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f2), task="dbpedia", format="labeled-pairs", min_relevance=2,
                                                    columns={"query": "question", "document": "passage",
                                                             "label": "score"})], output=str(tmp_path / "m2.jsonl")))
    assert sorted(out.read_text().splitlines()) == sorted((tmp_path / "m2.jsonl").read_text().splitlines())
    # sentence-transformers' labeled-list: a query's documents and labels as two lists in one row
    lists: dict[str, tuple[list, list]] = {}
    for r in rows:
        lists.setdefault(r["question"], ([], []))[0].append(r["passage"])
        lists[r["question"]][1].append(r["score"])
    f3 = _write(tmp_path / "lists.jsonl", [{"query": q, "docs": d, "labels": y} for q, (d, y) in lists.items()])
    run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f3), task="dbpedia", format="labeled-pairs",
                                                    min_relevance=2)], output=str(tmp_path / "m3.jsonl")))
    assert {r["query"]: r for r in map(json.loads, (tmp_path / "m3.jsonl").read_text().splitlines())} == got


def test_labeled_pairs_it_cannot_read_are_named(tmp_path):
    """A label that is no number (or negative), a pair without its document, too few columns, a column not there,
    and labeled pairs given where rows are read one by one (a data.mixture source): each one line naming it."""
    ok = {"q": "what is gravity?", "d": "Gravity attracts masses.", "y": 1}
    for bad, col, msg in (({"y": "yes"}, "y", r"must be a number >= 0 \(the pair's label\), got 'yes'"),
                          ({"y": -1}, "y", "must be a number >= 0"), ({"d": ""}, "d", r"is empty \(the pair's document\)"),
                          ({"d": ["a", "b"], "y": [1]}, "y", "1 labels for 2 documents")):
        f = _write(tmp_path / "p.jsonl", [ok, ok | bad])
        with pytest.raises(DataError, match=rf"p.jsonl:2: field '{col}': {msg}"):
            run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), format="labeled-pairs")],
                                      output=str(tmp_path / "o.jsonl")))
    two = _write(tmp_path / "two.jsonl", [{"q": "a", "d": "b"}])
    with pytest.raises(ConfigError, match=r"reads the columns query, document, label .* first row's are q, d"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(two), format="labeled-pairs")],
                                  output=str(tmp_path / "o.jsonl")))
    f = _write(tmp_path / "p.jsonl", [ok])
    with pytest.raises(ConfigError, match=r"first row's are q, d, y"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(f), format="labeled-pairs",
                                                        columns={"label": "relevance"})], output=str(tmp_path / "o.jsonl")))
    with pytest.raises(ConfigError, match=r"make prepare groups them by query into records"):
        ref(MixtureSource(dataset="json", data_files=[str(f)], format="labeled-pairs"))


def test_make_prepare_reads_a_file_holding_one_json_array(tmp_path):
    """ms-swift's datasets (and anything json.dump wrote) often come as one JSON array in a .json file: make prepare
    holds its mix whole anyway, so it reads such a file as it is (before: "not valid JSON" at line 1). An item is
    named file[i]; JSON Lines whose first row is a list is still read line by line."""
    tev, _ = _dbpedia_rows()
    rows, ours = _swift_rows(tev)
    (tmp_path / "swift.json").write_text(json.dumps(rows, indent=2))
    _write(tmp_path / "swift.jsonl", rows)
    for name in ("swift.json", "swift.jsonl"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(tmp_path / name), task="t", format="ms-swift")],
                                  output=str(tmp_path / f"{name}.out.jsonl"), seed=1))
    assert (tmp_path / "swift.json.out.jsonl").read_text() == (tmp_path / "swift.jsonl.out.jsonl").read_text()
    rows[2]["positive_messages"] = [[{"role": "user", "content": " "}]]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad.json\[2\]: field 'positive_messages\[0\]': its text is empty"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(tmp_path / "bad.json"), format="ms-swift")],
                                  output=str(tmp_path / "o.jsonl")))
    summary = run_prepare(PrepareConfig(sources=[SourceConfig(path=str(tmp_path / "bad.json"), format="ms-swift")],
                                        output=str(tmp_path / "o.jsonl"), on_error="skip"))
    rej = json.loads((tmp_path / "o_rejects.jsonl").read_text())
    assert summary["records"] == len(rows) - 1 and rej["where"].endswith("bad.json[2]") and json.loads(rej["raw"]) == rows[2]
    (tmp_path / "listrow.jsonl").write_text('["q", "p"]\n{"query": "q", "pos": ["p"]}\n')
    with pytest.raises(DataError, match=r"listrow.jsonl:1: field '<record>': must be a JSON object, got list"):
        run_prepare(PrepareConfig(sources=[SourceConfig(path=str(tmp_path / "listrow.jsonl"))],
                                  output=str(tmp_path / "o.jsonl")))
