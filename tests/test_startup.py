"""A stage's process does not import scikit-learn (nor the scipy.stats and pandas behind it) for transformers'
assisted generation, which no stage uses: 1.0-1.6 s of every process's start (qwen3train/startup.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def _imported(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reports (one line each on stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_a_stage_loads_its_model_without_scikit_learn(tiny_model_dir, tmp_path):
    """Fails if the entry point stops installing the hook (sklearn imported again), or if the hook hides
    scikit-learn from anything but transformers' generation code (sentence-transformers, which needs it, fails
    to import); the control shows that transformers still imports it where the hook is not installed (if it
    ever stops, the hook is dead code and goes)."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    data = make_pairs(tmp_path / "d.jsonl", n=8)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPROFILEIMPORTTIME="1")
    stage = subprocess.run([sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1",
                            f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{data}]", "run.max_steps=1",
                            "engine.micro_batch_size=4", "engine.global_batch_size=4",
                            f"run.output_dir={tmp_path}/run"], env=env, capture_output=True, text=True, timeout=600,
                           cwd=REPO)
    assert stage.returncode == 0, stage.stderr[-3000:]
    loaded = _imported(stage.stderr)
    assert "transformers.generation.candidate_generator" in loaded and "qwen3train.startup" in loaded
    assert not {"sklearn", "scipy.stats"} & loaded, sorted({"sklearn", "scipy.stats"} & loaded)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()

    probe = ("import sys\nfrom qwen3train.startup import lean_transformers\nhooked = '--lean' in sys.argv\n"
             "hooked and lean_transformers()\nimport transformers.generation.candidate_generator as cg\n"
             "print(int('sklearn' in sys.modules), int(cg.is_sklearn_available()))\n"
             "import transformers.utils.import_utils as iu\nimport sentence_transformers\n"
             "print(int(iu.is_sklearn_available()), int('sklearn' in sys.modules))\n")
    for flag, want in (("--lean", ["0 0", "1 1"]), ("--plain", ["1 1", "1 1"])):
        proc = subprocess.run([sys.executable, "-c", probe, flag], env=dict(os.environ, PYTHONWARNINGS="ignore"),
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        got = [line for line in proc.stdout.splitlines() if line[:1].isdigit()]  # (imports print notes too)
        assert proc.returncode == 0 and got == want, (flag, proc.stdout, proc.stderr[-2000:])
