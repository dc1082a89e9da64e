"""`pip install .` gives a working tool: the wheel ships the configs, the `qwen3train` command runs a stage
from any folder, and a user's own config folder can be added."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO


def test_wheel_lists_every_package():
    """pyproject names packages one by one (configs/ is mapped in): a new subpackage left out of the list
    would be missing from every installed copy while the source tree still works."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "qwen3train").rglob("__init__.py")}
    assert listed == found | {"qwen3train.configs"}


@pytest.mark.slow
def test_installed_wheel_runs_a_stage_from_another_folder(tiny_model_dir, tmp_path):
    """Built wheel, installed into its own folder, run as `qwen3train stage1` from an unrelated working
    directory: catches configs missing from the wheel, a config path pointing into the source tree, and
    outputs written relative to the package instead of the caller."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    dist, site, work, src = tmp_path / "dist", tmp_path / "site", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".whl", "tests"))
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, env=env, timeout=600, capture_output=True)
    wheel = next(dist.glob("qwen3train-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, env=env, timeout=600, capture_output=True)
    env = dict(env, PYTHONPATH=str(site), PYTHONWARNINGS="ignore")
    probe = subprocess.run([sys.executable, "-c", "import qwen3train, qwen3train.cli.main as m; "
                            "print(qwen3train.__file__); print(m._config_path())"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.split() == [str(site / "qwen3train" / "__init__.py"), "pkg://qwen3train.configs"], probe
    data = make_pairs(work / "pairs.jsonl", n=24, k=0)
    mine = tmp_path / "mine"  # a user's config folder: a primary of their own built on the shipped stage1
    mine.mkdir()
    (mine / "mystage.yaml").write_text("defaults:\n  - stage1\n  - _self_\nrun:\n  max_steps: 2\n")
    cmd = [str(site / "bin" / "qwen3train"), "mystage", f"--config-dir={mine}", f"model.name_or_path={tiny_model_dir}",
           f"data.train_files=[{data}]", "engine.micro_batch_size=8", "engine.global_batch_size=8",
           "run.output_dir=runs/s1"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "runs" / "s1" / "final" / "modules.json").exists()
    assert len((work / "runs" / "s1" / "metrics.jsonl").read_text().splitlines()) == 2  # the user's max_steps
    usage = subprocess.run([str(site / "bin" / "qwen3train"), "--help"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=300)
    assert usage.returncode == 0 and re.search(r"commands: .*pipeline.*stage1", usage.stdout)
