"""Versioned prompt templates (``qwen3train/resources/prompts/<version>/*.txt``) and their rendering."""

from __future__ import annotations

import string
from pathlib import Path

PROMPT_ROOT = Path(__file__).resolve().parents[1] / "resources" / "prompts"
QUESTION_TYPES = ("keywords", "acquire_knowledge", "summary", "yes_or_no", "background")
DIFFICULTIES = ("high_school", "university", "phd")

# Output schemas (JSON Schema) per template: used to validate, and for constrained decoding.
SCHEMAS = {
    "retrieval_config": {"type": "object", "properties": {
        "Character": {"type": "string"},
        "Question_Type": {"type": "string", "enum": list(QUESTION_TYPES)},
        "Difficulty": {"type": "string", "enum": list(DIFFICULTIES)}},
        "required": ["Character", "Question_Type", "Difficulty"]},
    "retrieval_query": {"type": "object", "properties": {"Query": {"type": "string"}}, "required": ["Query"]},
    "bitext": {"type": "object", "properties": {"Translation": {"type": "string"}}, "required": ["Translation"]},
    "sts": {"type": "object", "properties": {"Paraphrase": {"type": "string"}}, "required": ["Paraphrase"]},
    "classification": {"type": "object", "properties": {"Category": {"type": "string"}}, "required": ["Category"]},
}


class PromptSet:
    def __init__(self, version: str = "v1", root: str | Path | None = None) -> None:
        self.version = version
        folder = Path(root or PROMPT_ROOT) / version
        if not folder.is_dir():
            raise FileNotFoundError(f"prompt version {version!r} not found under {folder.parent}")
        texts = {name: (folder / f"{name}.txt").read_text(encoding="utf-8") for name in SCHEMAS}
        self.templates = {name: string.Template(t) for name, t in texts.items()}
        # word 5-grams of the worked examples: small models copy them instead of answering
        self.example_ngrams = {name: ngrams(" ".join(ln for ln in t.splitlines() if "**output**" in ln), 5)
                               for name, t in texts.items()}

    def render(self, name: str, **fields) -> str:
        """Fill a template; a missing field raises KeyError naming it."""
        return self.templates[name].substitute(**fields)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    from qwen3train.synth.parse import normalize

    words = normalize(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copies_example(prompts: "PromptSet", template: str, value: str, n: int = 5) -> bool:
    """Whether ``value`` repeats a run of ``n`` words from the template's worked examples."""
    return bool(ngrams(value, n) & prompts.example_ngrams[template])
