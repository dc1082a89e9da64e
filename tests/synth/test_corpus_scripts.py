"""Passage chunking and sentence splitting on real text of scripts with and without spaces: Chinese and
Japanese (CPython's own test data, Lib/test/cjkencodings), Russian (gensim's test copy of Crime and
Punishment), Arabic (the ARCD fixture). Before, a Chinese document was one whitespace "word" and was
dropped as too short, and STS/bitext sources were cut at ". " only."""

from __future__ import annotations

import importlib.util
import json
import re
import sysconfig
from pathlib import Path

import pytest

from conftest import FIXTURES
from qwen3train.synth.corpus import chunk, count_units, head, passages, sentences

CJK = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings"
GENSIM = Path(importlib.util.find_spec("gensim").submodule_search_locations[0]) / "test" / "test_data"


def real(name: str) -> str:
    path = {"zh": CJK / "gb2312-utf8.txt", "ja": CJK / "euc_jp-utf8.txt",
            "ru": GENSIM / "crime-and-punishment.txt"}[name]
    if not path.exists():
        pytest.skip(f"{path} is not part of this Python / gensim install")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("lang", ["zh", "ja"])
def test_text_without_spaces_is_cut_by_characters(lang, tmp_path):
    text = real(lang)
    assert len(text.split()) < 30 < count_units(text)  # few whitespace words, many characters
    parts = chunk(text, 60, 0)
    assert len(parts) >= 3 and all(count_units(p) <= 60 for p in parts)
    # nothing lost or invented: the passages hold every character of the text, in order
    assert "".join(p.replace(" ", "") for p in parts) == re.sub(r"\s", "", text)
    # a hard line break between two Han/kana characters is not a word boundary
    assert not any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff] [\u3040-\u30ff\u4e00-\u9fff]", p) for p in parts) \
        or lang == "ja"  # Japanese keeps the spaces the author typed (モンティ パイソン)
    doc = tmp_path / "d.jsonl"
    doc.write_text(json.dumps({"text": text, "language": lang}, ensure_ascii=False) + "\n")
    got, stats = passages([doc], max_words=120, overlap=0, min_words=20, default_language="x")
    assert stats["too_short"] == 0 and len(got) >= 2  # was: one 5-"word" document, dropped


@pytest.mark.parametrize("lang,end", [("zh", "。"), ("ja", "。")])
def test_cjk_sentences_end_at_their_punctuation(lang, end):
    sents = sentences(real(lang))
    assert len(sents) >= 4 and sum(s.endswith(end) for s in sents) >= len(sents) - 2
    assert all("\n" not in s for s in sents)


def test_russian_and_arabic_keep_word_units_and_sentences():
    ru = real("ru")[:4000]
    assert count_units(ru) == len(ru.split())  # spaced scripts: a unit is a word, as before
    sents = sentences(ru)
    assert len(sents) > 10 and sents[0].startswith("В начале июля") and sents[0].endswith(".")
    assert head(ru, 3) == "В начале июля,"
    docs = [json.loads(x)["text"] for x in (FIXTURES / "arcd" / "corpus.jsonl").read_text().splitlines()]
    ar = next(d for d in docs if "؟" in d)
    parts = sentences(ar)
    assert any(p.endswith("؟") for p in parts) and len(parts) >= 2  # the Arabic question mark ends a sentence
    assert count_units(ar) == len(ar.split())


def test_passages_in_generator_tokens(tiny_model_dir, tmp_path):
    """synth.passage_tokens: passages measured with the generator's tokenizer (Qwen3's here)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    doc = tmp_path / "d.jsonl"
    doc.write_text(json.dumps({"text": real("zh")}, ensure_ascii=False) + "\n"
                   + json.dumps({"text": "短句。"}, ensure_ascii=False) + "\n")
    got, stats = passages([doc], max_words=40, overlap=0, min_words=5, default_language="zh", tokenizer=tok)
    sizes = [len(tok(p.text, add_special_tokens=False)["input_ids"]) for p in got]
    assert len(got) >= 3 and max(sizes) <= 41 and stats["too_short"] == 1  # the 2-token document


def test_german_sentences_words_and_persona_tokens(tmp_path):
    """Real German (Django 5.2.19's German translations, BSD-3-Clause, tests/fixtures/german_django.jsonl):
    sentences end at . ? ! but not inside „…“ quotes or hyphenated compounds; a unit is a whitespace word
    (E-Mail-Adresse is one); the persona index tokenizes umlaut and ß words whole (the old [a-z0-9]+
    tokenizer cut "standardmäßig" into "standardm" + "ig")."""
    from qwen3train.synth.personas import _tokens

    rows = [json.loads(x) for x in (FIXTURES.parent / "german_django.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 14
    sents = [sentences(r["text"]) for r in rows]
    assert [len(s) for s in sents] == [2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 2, 2, 2, 2]
    for r, s in zip(rows, sents):
        assert " ".join(s) == r["text"]  # nothing lost or reordered
        assert all(x[0].isupper() and x[-1] in ".?!" for x in s)
    assert sents[6][0] == "Passwort vergessen?"
    assert sents[9][1] == "Sie wollten wahrscheinlich auf „Ausführen“ und nicht auf „Speichern“ klicken."
    assert sents[13][0] == "Beispiel: „flatpages/contact_page.html“."
    text = " ".join(r["text"] for r in rows)
    assert count_units(text) == len(text.split())
    parts = chunk(text, 40, 0)
    assert all(count_units(p) <= 40 for p in parts) and " ".join(parts).split() == text.split()
    assert "E-Mail-Adresse" in " ".join(parts).split()
    toks = _tokens(rows[13]["text"] + " " + rows[0]["text"])
    assert "standardmäßig" in toks and "sicherheitsgründen" in [t.lower() for t in toks]
    doc = tmp_path / "de.jsonl"
    doc.write_text(json.dumps({"text": text, "language": "de"}, ensure_ascii=False) + "\n", encoding="utf-8")
    got, stats = passages([doc], max_words=40, overlap=0, min_words=20, default_language="x")
    assert stats["too_short"] == 0 and len(got) == len(parts) and {p.language for p in got} == {"de"}


def test_token_passages_of_a_huge_document_are_cut_a_window_at_a_time(tokenizer, monkeypatch):
    """A document is tokenized a window at a time (whole, 100M characters took 11 GB), ending each window at a
    space between two words: the token spans, and so the passages, equal the whole document's. Mixed words,
    whitespace runs, line breaks, CJK, combining marks and contractions; windows of 2,000 and 7,000
    characters over a ~100,000-character text. Would catch a window that shifts offsets or splits a token."""
    import random

    from qwen3train.synth import corpus

    rng = random.Random(0)
    pieces = ["gravity", "tensor", "  ", "\n\n", "ünïcödé", "e\u0301", "数据检索", "=====", "x" * 300, "\t", "it's"]
    text = "".join(rng.choice(pieces) + rng.choice(["", " ", " "]) for _ in range(5000))
    whole = corpus.token_spans(text, tokenizer, window=10 ** 9)
    calls = []
    real = type(tokenizer).__call__
    for window in (2000, 7000):
        assert corpus.token_spans(text, tokenizer, window=window) == whole, window
    monkeypatch.setattr(corpus, "TOKEN_WINDOW", 7000)
    want = corpus.chunk(text, 64, 8, lambda t, **kw: calls.append(len(t)) or real(tokenizer, t, **kw))
    assert len(calls) > len(text) // 7000 and max(calls) <= 7000  # windows, not the whole text
    monkeypatch.setattr(corpus, "TOKEN_WINDOW", 10 ** 9)
    assert corpus.chunk(text, 64, 8, tokenizer) == want and len(want) > 100


def test_a_parquet_corpus_reads_as_its_jsonl_copy_titles_included(tmp_path):
    """A Parquet corpus lost its titles (a BEIR corpus converted to Parquet gave 'Text' where its JSONL gave
    'Title. Text') and a row without text became an empty document; now both formats read alike, and a row
    without text is refused by its row."""
    import datasets

    from qwen3train.data.records import DataError
    from qwen3train.synth.corpus import read_documents

    src = FIXTURES / "dbpedia" / "corpus.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()[:40]]
    assert sum(bool(r.get("title")) for r in rows) > 30  # the fixture's documents are titled
    jsonl, parquet = tmp_path / "c.jsonl", tmp_path / "c.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for sep in (". ", " "):
        a, b = list(read_documents([jsonl], "en", sep)), list(read_documents([parquet], "en", sep))
        assert a == b and len(a) == len(rows)
        assert a[0][1] == f"{rows[0]['title']}{sep}{rows[0]['text']}"
    broken = tmp_path / "broken.parquet"
    datasets.Dataset.from_list(rows[:3] + [dict(rows[3], text=None)]).to_parquet(str(broken))
    with pytest.raises(DataError, match=r"broken\.parquet:row 3.*'text'"):
        list(read_documents([broken], "en"))


def test_a_mining_corpus_may_be_a_collection_or_its_tsv(tmp_path):
    """`mine.corpus=[/data/msmarco/collection.tsv]` was read as plain text: MS MARCO's 8.8M passages as one
    document (no blank line in it), silently; a collection folder was not a corpus at all. Now a TSV file reads
    as its documents, a collection folder (BEIR, MS MARCO, TREC) as its documents, each as its BEIR JSONL reads
    (title joined); another suffix is refused instead of read as one document."""
    from qwen3train.errors import ConfigError
    from qwen3train.mining.mine import load_corpus

    beir = FIXTURES / "dbpedia"
    want = load_corpus([str(beir / "corpus.jsonl")])
    assert len(want) == 182 and load_corpus([str(beir)]) == want
    flat = [" ".join(t.split()) for t in want]  # a TSV holds no tab or line break
    tsv = tmp_path / "msmarco"
    tsv.mkdir()
    ids = [json.loads(x)["_id"] for x in (beir / "corpus.jsonl").read_text().splitlines()]
    (tsv / "collection.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in zip(ids, flat)))
    assert load_corpus([str(tsv / "collection.tsv")]) == flat == load_corpus([str(tsv)])
    trec = FIXTURES / "vaswani"
    assert len(load_corpus([str(trec)])) == 241
    (tmp_path / "c.csv").write_text("id,text\n1,a passage\n2,another\n")
    with pytest.raises(ConfigError, match=r"c.csv: a corpus file is JSONL .* not .csv"):
        load_corpus([str(tmp_path / "c.csv")])
    with pytest.raises(ConfigError, match=r"a folder of documents is a collection"):
        load_corpus([str(tmp_path)])
