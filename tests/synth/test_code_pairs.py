"""Stage 0's code tasks: docstring/comment <-> function pairs from source files (real stdlib Python; a
small C file isolates the brace-language scanner), and their place in the synth output."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from qwen3train.synth.code import code_pairs

C_SRC = """#include <stdio.h>

/* Add two integers and return
 * their sum. */
int add(int a, int b) {
    int c = a + b;
    return c;
}

// Print a greeting to standard output
void hello(void) {
    if (1) {
        printf("hi\\n");
    }
}

int undocumented(int x) {
    return x;
}
"""


def test_python_functions_from_the_stdlib():
    rows, stats = code_pairs([str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py")])
    by = {(r["task"], r["provenance"]["source"].rsplit(":", 1)[1]): r for r in rows}
    t2c = next(r for r in rows if r["task"] == "text2code" and r["pos"][0].startswith("def dumps("))
    assert t2c["query"].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert '"""' not in t2c["pos"][0] and "return" in t2c["pos"][0]  # the code without its docstring
    c2t = by[("code2text", t2c["provenance"]["source"].rsplit(":", 1)[1])]
    assert c2t["query"] == t2c["pos"][0] and c2t["pos"] == [t2c["query"]]  # the reverse direction
    assert t2c["provenance"]["language"] == "Python" and stats["by_language"]["Python"] == len(rows) // 2


def test_brace_language_functions_with_comments(tmp_path):
    (tmp_path / "a.c").write_text(C_SRC)
    rows, stats = code_pairs([str(tmp_path / "*.c")])
    t2c = {r["query"]: r["pos"][0] for r in rows if r["task"] == "text2code"}
    assert t2c == {"Add two integers and return their sum.": "int add(int a, int b) {\n    int c = a + b;\n    return c;\n}",
                   "Print a greeting to standard output":
                       'void hello(void) {\n    if (1) {\n        printf("hi\\n");\n    }\n}'}
    assert stats["functions"] == 2  # the undocumented function gives no pair


def test_code_pairs_in_the_synth_output(tmp_path, tokenizer):
    from test_pipeline import ScriptedBackend, cfg_for

    from qwen3train.synth.pipeline import run

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_text(C_SRC)
    json_init = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
    cfg = cfg_for(tmp_path, code_corpus=[str(tmp_path / "src" / "*.c"), json_init])
    cfg.heldout_fraction = 0.5
    out = run(cfg, backend=ScriptedBackend(tokenizer))
    rows = [json.loads(x) for f in ("pairs.jsonl", "heldout.jsonl") for x in (out / f).read_text().splitlines()]
    code = [r for r in rows if r["task"] in ("text2code", "code2text")]
    stats = json.loads((out / "stats.json").read_text())
    assert len(code) == 2 * (stats["code"]["by_language"]["C"] + stats["code"]["by_language"]["Python"]) > 10
    train_src = {json.loads(x)["provenance"].get("source") for x in (out / "pairs.jsonl").read_text().splitlines()}
    held_src = {json.loads(x)["provenance"].get("source") for x in (out / "heldout.jsonl").read_text().splitlines()}
    assert not (train_src & held_src) - {None}  # both directions of a function stay on one side of the split
    assert any(r["task"] == "retrieval" for r in rows)  # the generated tasks are still there
