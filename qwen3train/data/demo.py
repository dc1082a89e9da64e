"""Real training pairs from Python's standard-library docstrings, present wherever Python is.

Each documented function or class gives a pair: its docstring's summary line is the query, the
rest of the docstring (with the signature) is the positive. Files are parsed with ``ast``; nothing
is imported or executed. Hard negatives for stage-2 demos are docstrings of other objects of the
same module (topically close). A seeded share of the pairs is held out for evaluation.

    python -m qwen3train.data.demo outputs/data
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

from qwen3train.data.jsonl import write_jsonl

INSTRUCTION = "Given a one-line summary of a Python function or class, retrieve its documentation"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "__pycache__", "ensurepip"}


def _signature(node) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    try:
        return f"def {node.name}({ast.unparse(node.args)})"
    except Exception:  # noqa: BLE001 - odd syntax in a stdlib file must not stop the build
        return f"def {node.name}(...)"


def docstring_pairs(stdlib: Path | None = None, min_body: int = 60) -> list[dict]:
    """(query = summary line, positive = signature + rest of the docstring) for the whole stdlib."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    pairs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            parts = doc.strip().split("\n\n", 1)
            summary = " ".join(parts[0].split())
            body = " ".join(parts[1].split()) if len(parts) > 1 else ""
            if len(summary) < 15 or len(body) < min_body or summary in seen:
                continue
            seen.add(summary)
            pairs.append({"query": summary, "pos": [f"{_signature(node)}: {body}"], "module": module})
    return pairs


def build(out_dir: str | Path, seed: int = 0, holdout: float = 0.1, num_neg: int = 3) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = docstring_pairs()
    rng = random.Random(seed)
    rng.shuffle(pairs)
    n_test = int(len(pairs) * holdout)
    test, train = pairs[:n_test], pairs[n_test:]
    by_module = defaultdict(list)
    for p in train:
        by_module[p["module"].split(".")[0]].append(p["pos"][0])

    def write(name: str, rows: list[dict]) -> None:
        write_jsonl(out / name, rows)

    base = lambda p: {"query": p["query"], "pos": p["pos"], "task": "pydoc", "instruction": INSTRUCTION}
    write("train_pairs.jsonl", [base(p) for p in train])
    hn = []
    for p in train:
        pool = [d for d in by_module[p["module"].split(".")[0]] if d != p["pos"][0]]
        if len(pool) < num_neg:
            continue
        hn.append(dict(base(p), neg=rng.sample(pool, num_neg)))
    write("train_hn.jsonl", hn)
    write("heldout.jsonl", [base(p) for p in test])
    # documents for stage-0 generation: the training docstrings as a corpus (held-out ones excluded)
    write("corpus.jsonl", [{"_id": f"{p['module']}#{i}", "text": f"{p['query']} {p['pos'][0]}", "language": "English"}
                           for i, p in enumerate(train)])
    stats = {"train_pairs": len(train), "train_hn": len(hn), "heldout": len(test),
             "python": sys.version.split()[0]}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "outputs/data"))
