"""The code tasks of stage 0: docstring/comment <-> function pairs read from source files.

``synth.code_corpus`` (globs of source files) adds two tasks beside the generated ones, in the shape of
MTEB-Code's CodeSearchNet tasks:

* ``text2code``: the documentation (a docstring's text, or the ``#`` comment block right above the
  function) is the query, the function's code without it is the positive
  (CodeSearchNetCCRetrieval's direction);
* ``code2text``: the code is the query, the documentation the positive (CodeSearchNetRetrieval's).

Python files are parsed with ``ast`` (nothing is imported or run); other languages (C, C++, Java,
JavaScript, TypeScript, Go, Rust, ...) are read with a brace-matching scan for functions that carry a
``//``, ``/* */`` or ``/** */`` comment right above them. Functions with too little documentation or code
are skipped and counted. Each pair records its language, file and line in ``provenance``.
"""

from __future__ import annotations

import ast
import glob
import re
from pathlib import Path

from qwen3train.data.records import text_hash

INSTRUCTIONS = {
    "text2code": "Given a code comment, retrieve the code snippet corresponding to that comment.",
    "code2text": "Given a code snippet, retrieve the comment corresponding to that code.",
}
LANGUAGES = {".py": "Python", ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++", ".hpp": "C++", ".java": "Java",
             ".js": "JavaScript", ".ts": "TypeScript", ".go": "Go", ".rs": "Rust", ".cs": "C#", ".kt": "Kotlin",
             ".swift": "Swift", ".php": "PHP", ".scala": "Scala"}
_FUNC_HEAD = re.compile(r"^[ \t]*(?:[\w:<>\[\],*&.]+[ \t]+)*[\w:~.]+[ \t]*\([^;{}]*\)[^;{}]*\{[ \t]*$")


def _python(path: Path, text: str):
    """(doc, code, line) per documented function of a Python file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno])
        code_lines = lines[start - 1:node.end_lineno]
        doc = ast.get_docstring(node)
        if doc and node.body and isinstance(node.body[0], ast.Expr):
            b = node.body[0]  # the code without its docstring
            code_lines = lines[start - 1:b.lineno - 1] + lines[b.end_lineno:node.end_lineno]
        else:  # a comment block right above the function
            above, i = [], start - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            doc = " ".join(above) if above else None
        if doc:
            yield doc, "\n".join(code_lines), node.lineno


def _braced(path: Path, text: str):
    """(doc, code, line) per function with a comment right above it, in a brace language."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not _FUNC_HEAD.match(lines[i]) or lines[i].lstrip().startswith(("if", "for", "while", "switch", "else")):
            i += 1
            continue
        depth, j = 0, i
        for j in range(i, len(lines)):  # to the matching closing brace (strings and comments not parsed)
            depth += lines[j].count("{") - lines[j].count("}")
            if depth <= 0 and j > i or (depth == 0 and j == i and "}" in lines[j]):
                break
        above, k = [], i - 1
        if k >= 0 and lines[k].strip().endswith("*/"):
            while k >= 0:
                above.insert(0, lines[k].strip())
                if lines[k].strip().startswith("/*"):
                    break
                k -= 1
        else:
            while k >= 0 and lines[k].strip().startswith("//"):
                above.insert(0, lines[k].strip())
                k -= 1
        doc = " ".join(re.sub(r"^(/\*+|\*+/?|//+)\s*|\s*\*+/$", "", x).strip() for x in above).strip()
        if doc:
            yield doc, "\n".join(lines[i:j + 1]), i + 1
        i = j + 1


def code_pairs(patterns: list[str], *, min_doc_words: int = 3, min_code_lines: int = 2, max_code_chars: int = 4000,
               limit: int = 0) -> tuple[list[dict], dict]:
    """text2code and code2text pairs from the source files matched by ``patterns``; (pairs, stats)."""
    files = sorted({Path(p) for pat in patterns for p in glob.glob(pat, recursive=True)})
    stats = {"files": 0, "functions": 0, "skipped_short": 0, "skipped_long": 0, "by_language": {}}
    out, seen = [], set()
    for path in files:
        lang = LANGUAGES.get(path.suffix.lower())
        if lang is None or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        stats["files"] += 1
        for doc, code, line in (_python if lang == "Python" else _braced)(path, text):
            stats["functions"] += 1
            doc = re.sub(r"\s+", " ", doc).strip()
            if len(doc.split()) < min_doc_words or len([x for x in code.splitlines() if x.strip()]) < min_code_lines:
                stats["skipped_short"] += 1
                continue
            if len(code) > max_code_chars:
                stats["skipped_long"] += 1
                continue
            h = text_hash(code)
            if h in seen:
                continue
            seen.add(h)
            prov = {"task": None, "language": lang, "corpus_language": lang, "source": f"{path}:{line}",
                    "generator": "extracted", "backend": "code"}
            for task, (q, p) in (("text2code", (doc, code)), ("code2text", (code, doc))):
                out.append({"query": q, "pos": [p], "task": task, "instruction": INSTRUCTIONS[task],
                            "provenance": {**prov, "task": task}})
            stats["by_language"][lang] = stats["by_language"].get(lang, 0) + 1
            if limit and len(out) >= 2 * limit:
                return out, stats
    return out, stats
