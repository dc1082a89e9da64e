"""`pip install .` gives a working tool: the wheel ships the configs, the `qwen3train` command runs a stage
from any folder, and a user's own config folder can be added."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO


def test_wheel_lists_every_package():
    """pyproject names packages one by one (configs/ is mapped in): a new subpackage left out of the list
    would be missing from every installed copy while the source tree still works."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "qwen3train").rglob("__init__.py")}
    assert listed == found | {"qwen3train.configs"}


def _fresh_venv(root):
    """A new venv (its own interpreter and bin/) that sees this environment's installed dependencies through
    a .pth line, so nothing is downloaded. Only a site dir's .pth files run, so the editable qwen3train of
    this environment stays invisible; the wheel installed here is the only copy. No bundled pip/setuptools
    (they would shadow newer ones torch requires): this environment's pip installs into it (`--python`)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300,
                   capture_output=True)
    py = root / "bin" / "python"
    fresh_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                                capture_output=True, text=True, timeout=60).stdout.strip()
    import site

    (Path(fresh_site) / "_qwen3train_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


@pytest.mark.slow
def test_installed_wheel_runs_a_stage_from_another_folder(tiny_model_dir, tmp_path):
    """Built wheel, `pip install`ed (dependencies resolved by pip, nothing fetched) into a fresh venv, run as
    `qwen3train stage1` from an unrelated working directory: catches configs missing from the wheel, a
    dependency missing from the wheel's metadata, a config path pointing into the source tree, and outputs
    written relative to the package instead of the caller."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    dist, venv, work, src = tmp_path / "dist", tmp_path / "venv", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".whl", "tests"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, env=env, timeout=600, capture_output=True)
    wheel = next(dist.glob("qwen3train-*.whl"))
    py = _fresh_venv(venv)
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", str(wheel)], env=env, timeout=600, capture_output=True,
                          text=True)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]  # PIP_NO_INDEX: a missing dep fails
    site_dir = Path(subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                                   capture_output=True, text=True, timeout=60).stdout.strip())
    probe = subprocess.run([str(py), "-c", "import qwen3train, qwen3train.cli.main as m; "
                            "print(qwen3train.__file__); print(m._config_path())"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.split() == [str(site_dir / "qwen3train" / "__init__.py"), "pkg://qwen3train.configs"], probe
    data = make_pairs(work / "pairs.jsonl", n=24, k=0)
    mine = tmp_path / "mine"  # a user's config folder: a primary of their own built on the shipped stage1
    mine.mkdir()
    (mine / "mystage.yaml").write_text("defaults:\n  - stage1\n  - _self_\nrun:\n  max_steps: 2\n")
    exe = str(venv / "bin" / "qwen3train")
    cmd = [exe, "mystage", f"--config-dir={mine}", f"model.name_or_path={tiny_model_dir}",
           f"data.train_files=[{data}]", "engine.micro_batch_size=8", "engine.global_batch_size=8",
           "run.output_dir=runs/s1"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "runs" / "s1" / "final" / "modules.json").exists()
    assert len((work / "runs" / "s1" / "metrics.jsonl").read_text().splitlines()) == 2  # the user's max_steps
    usage = subprocess.run([exe, "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0 and re.search(r"commands: .*pipeline.*stage1", usage.stdout)
