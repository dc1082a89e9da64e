"""Each stage target of the Makefile runs the entry point with its own config, and no target is
defined twice (make silently keeps the last recipe: a duplicated `merge` once ran the benchmark)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO

STAGES = ["synth", "stage1", "filter", "mine", "score", "prepare", "stage2", "rerank", "merge", "eval", "pipeline"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", STAGES)
def test_stage_target_runs_its_config(target):
    p = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "overriding recipe" not in p.stderr, p.stderr
    assert "qwen3train.cli.main" in p.stdout or "launch.sh" in p.stdout, p.stdout
    assert f"--config-name={target}" in p.stdout, p.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_overrides_with_braces_commas_and_spaces_reach_the_command_whole(tmp_path):
    """ARGS is passed unquoted (it holds several overrides). bash brace-expanded `{path:a,task:x}` into two
    words (`sources=[path:a` and `sources=[task:x`), so a mapping of two entries never reached Hydra, and a
    space inside one split it. Both spellings now give the mix they say. Would catch either coming back."""
    import json

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"query": "qa", "pos": ["pa"]}) + "\n")
    b.write_text(json.dumps({"query": "qb", "pos": ["pb"]}) + "\n")
    for n, args in enumerate([f"sources=[{{path:{a},task:alpha}},{{path:{b},task:beta,count:2}}]",
                              f"sources=[{{path: {a}, task: alpha}}, {{path: {b}, task: beta, count: 2}}]"]):
        out = tmp_path / f"mix{n}.jsonl"
        p = subprocess.run(["make", "-s", "-o", ".venv/.installed", "prepare", f"ARGS={args} output={out}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted(r["task"] for r in rows) == ["alpha", "beta", "beta"], args
