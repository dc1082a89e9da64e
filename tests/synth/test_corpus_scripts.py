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
