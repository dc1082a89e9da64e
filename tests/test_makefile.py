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
