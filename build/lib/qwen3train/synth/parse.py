"""Parsing and validating LLM outputs. Every failure has a reason, counted and kept in rejects.

Tolerated: a JSON object wrapped in prose or a code fence, keys differing in case or spacing.
Rejected: no JSON object (``no_json``), broken JSON (``bad_json``), a missing key
(``missing_key:<name>``), a value outside its enum (``bad_value:<name>``), an empty value
(``empty``), too few or too many words (``too_short`` / ``too_long``), a value that copies the
passage (``copies_passage``) or a worked example of the prompt (``copies_example``).
"""

from __future__ import annotations

import json
import re


class ParseError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def extract_json(text: str) -> dict:
    """The first balanced ``{...}`` in ``text`` that decodes to a JSON object."""
    fence = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, flags=re.S)
    candidates = [fence.group(1)] if fence else []
    depth, start = 0, None
    in_str, esc = False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                candidates.append(text[start:i + 1])
    if not candidates:
        raise ParseError("no_json")
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ParseError("bad_json")


def _norm_key(k: str) -> str:
    return re.sub(r"[\s_-]+", "", k).lower()


def validate(obj: dict, schema: dict) -> dict:
    """Keys of ``schema`` (case/spacing-insensitive), enums respected, values non-empty strings."""
    by_norm = {_norm_key(k): v for k, v in obj.items()}
    out = {}
    for key, spec in schema["properties"].items():
        val = by_norm.get(_norm_key(key))
        if val is None:
            raise ParseError(f"missing_key:{key}")
        if not isinstance(val, str):
            raise ParseError(f"bad_value:{key}")
        val = " ".join(val.split())
        if not val:
            raise ParseError("empty")
        if "enum" in spec:
            low = val.lower().replace(" ", "_")
            if low not in spec["enum"]:
                raise ParseError(f"bad_value:{key}")
            val = low
        out[key] = val
    return out


def check_text(text: str, passage: str, *, min_words: int, max_words: int) -> str:
    n = len(text.split())
    if n < min_words:
        raise ParseError("too_short")
    if n > max_words:
        raise ParseError("too_long")
    if normalize(text) and normalize(text) in normalize(passage) and n >= 8:
        raise ParseError("copies_passage")
    return text


def normalize(text: str) -> str:
    """For de-duplication: lower case, punctuation and extra spaces removed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_output(text: str, schema: dict) -> dict:
    return validate(extract_json(text), schema)
