"""A stage's process does not import scikit-learn (nor the scipy.stats and pandas behind it) for transformers'
assisted generation, which no stage uses: 1.0-1.6 s of every process's start; nor scipy.optimize for its DETR-family
losses: 0.36 s more; and Python's cycle collector does
not walk the imports' and a checkpoint load's objects over and over: ~1.2 s more (qwen3train/startup.py)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from conftest import REPO


def _imported(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reports (one line each on stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


# imported first by the stage's interpreter (PYTHONPATH): counts the cycle collector's passes before the entry
# point froze its imports' objects, and at exit writes what it saw with the collector's state then
GC_PROBE = """import atexit, gc, json, os
seen = {"before_freeze": 0, "after_freeze": 0}
def count(phase, info):
    if phase == "stop":
        seen["after_freeze" if gc.get_freeze_count() else "before_freeze"] += 1
gc.callbacks.append(count)
def report():
    seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
    with open(os.environ["GC_PROBE_OUT"], "w") as f:
        json.dump(seen, f)
atexit.register(report)
"""


def test_a_stage_loads_its_model_without_scikit_learn(tiny_model_dir, tmp_path):
    """Fails if the entry point stops installing the hook (sklearn imported again), or if the hook hides
    scikit-learn from anything but transformers' generation code (sentence-transformers, which needs it, fails
    to import); the control shows that transformers still imports it where the hook is not installed (if it
    ever stops, the hook is dead code and goes).

    The same stage's cycle collector: off while the entry point imports (without it, hundreds of passes before
    the freeze), the imports' objects frozen (~190k), and back on for the run (left off,
    a long training would keep every reference cycle it ever made)."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    data = make_pairs(tmp_path / "d.jsonl", n=8)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(GC_PROBE)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPROFILEIMPORTTIME="1", GC_PROBE_OUT=str(tmp_path / "gc.json"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "probe"), os.environ.get("PYTHONPATH")])))
    stage = subprocess.run([sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1",
                            f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{data}]", "run.max_steps=1",
                            "engine.micro_batch_size=4", "engine.global_batch_size=4",
                            f"run.output_dir={tmp_path}/run"], env=env, capture_output=True, text=True, timeout=600,
                           cwd=REPO)
    assert stage.returncode == 0, stage.stderr[-3000:]
    loaded = _imported(stage.stderr)
    assert "transformers.generation.candidate_generator" in loaded and "qwen3train.startup" in loaded
    assert not {"sklearn", "scipy.stats", "scipy.optimize"} & loaded, sorted({"sklearn", "scipy"} & loaded)
    assert "transformers.loss.loss_for_object_detection" in loaded  # (imported, without its scipy)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    seen = json.loads((tmp_path / "gc.json").read_text())
    # before the freeze: at most the odd pass of the interpreter's own start-up before the entry point's module runs
    assert seen["before_freeze"] <= 3 and seen["frozen"] > 100_000 and seen["enabled"], seen
    assert seen["after_freeze"] > 0, seen  # (the probe sees the passes of the run itself)

    probe = ("import sys\nfrom qwen3train.startup import lean_transformers\nhooked = '--lean' in sys.argv\n"
             "hooked and lean_transformers()\nimport transformers.generation.candidate_generator as cg\n"
             "print(int('sklearn' in sys.modules), int(cg.is_sklearn_available()))\n"
             "import transformers.utils.import_utils as iu, transformers.utils as tu\n"
             "import transformers.loss.loss_rt_detr as rt\n"
             "print(int('scipy.optimize' in sys.modules), int(tu.is_scipy_available()), int(iu.is_scipy_available()))\n"
             "import sentence_transformers\n"
             "print(int(iu.is_sklearn_available()), int('sklearn' in sys.modules))\n")
    # hooked: transformers' DETR-family losses import without scipy.optimize, and is_scipy_available is the real
    # one again after them (anything else that asks sees scipy); the control imports it
    for flag, want in (("--lean", ["0 0", "0 1 1", "1 1"]), ("--plain", ["1 1", "1 1 1", "1 1"])):
        proc = subprocess.run([sys.executable, "-c", probe, flag], env=dict(os.environ, PYTHONWARNINGS="ignore"),
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        got = [line for line in proc.stdout.splitlines() if line[:1].isdigit()]  # (imports print notes too)
        assert proc.returncode == 0 and got == want, (flag, proc.stdout, proc.stderr[-2000:])


def test_a_checkpoint_loads_without_cycle_collection_and_the_collector_comes_back(tiny_model_dir):
    """``models.build.pretrained`` (every model, tokenizer and config load of ours) pauses the collector: the
    tiny Qwen3's tokenizer (151k entries parsed in Python by transformers 5) takes hundreds of collector passes
    loaded directly (the control: the test fails if that ever stops, and the pause is dead weight), through ours
    only the one or two as the collector comes back on; and the collector is on again after a load, and after one that fails (a user's wrong folder)."""
    from transformers import AutoTokenizer

    from qwen3train.errors import ConfigError
    from qwen3train.models.build import load_tokenizer, pretrained

    passes = []

    def count(phase, info):
        if phase == "stop":
            passes.append(info["generation"])

    gc.callbacks.append(count)
    try:
        AutoTokenizer.from_pretrained(tiny_model_dir)
        direct, passes[:] = len(passes), []
        tok = load_tokenizer(str(tiny_model_dir))
        ours = len(passes)
        assert gc.isenabled()
        try:
            pretrained(AutoTokenizer, str(tiny_model_dir) + "-missing")
        except ConfigError:
            pass
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)
    # ours: a pass or two when the collector comes back on (what the load allocated counts toward the next one)
    assert direct > 100 and ours <= 2, (direct, ours)
    assert tok("a tensor")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dir)("a tensor")["input_ids"]
