"""Every primary config composes and converts to its schema; mistakes fail at compose time."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import REPO
from qwen3train.train.config import TrainConfig
from qwen3train.losses.infonce import InfoNCEConfig

PRIMARY = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
ENGINES = sorted(p.stem for p in (REPO / "configs" / "engine").glob("*.yaml"))


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_composes(compose, name):
    """Each primary composes into its typed schema, and the one entry point knows how to run it."""
    from qwen3train.config import _primaries, runner_for

    cfg = compose(name)
    schema = (REPO / "configs" / f"{name}.yaml").read_text().split("defaults:")[1].split("- ")[1].split()[0]
    assert type(cfg) is _primaries()[schema][0]
    assert callable(runner_for(cfg))
    if isinstance(cfg, TrainConfig):
        from qwen3train.losses.rerank import RerankLossConfig

        assert isinstance(cfg.loss, RerankLossConfig if name == "rerank" else InfoNCEConfig)


@pytest.mark.parametrize("name,override,needle", [
    ("merge", "methd=slerp", "methd"), ("merge", "method=bogus", "bogus"),
    ("synth", "task_mix.retreival=1.0", "retreival"), ("synth", "shard_size=abc", "shard_size"),
])
def test_other_primaries_reject_mistakes(compose, name, override, needle):
    with pytest.raises(Exception) as err:
        compose(name, [override])
    assert needle in str(err.value) or needle in str(err.value.__cause__)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ENGINES)
def test_groups_compose(compose, model, engine):
    cfg = compose("stage1", [f"model={model}", f"engine={engine}"])
    assert cfg.model.name == model and cfg.engine.backend == {"torch": "torch", "fsdp": "fsdp"}.get(engine, "deepspeed")


def test_required_groups_exist():
    assert {"tiny", "qwen3-0.6b", "qwen3-4b", "qwen3-8b"} <= set(MODELS)
    assert {"torch", "zero1", "zero2", "zero3", "fsdp"} <= set(ENGINES)


@pytest.mark.parametrize("override,needle", [
    ("model.hiden_size=3", "hiden_size"),
    ("loss.temprature=0.1", "temprature"),
    ("engine.micro_batch_size=abc", "micro_batch_size"),
    ("run.save_evry=5", "save_evry"),
])
def test_typos_and_wrong_types_fail_naming_the_key(compose, override, needle):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        compose("stage1", [override])
    assert needle in str(err.value) or needle in str(err.value.__cause__)


def test_post_init_validation(compose):
    with pytest.raises(ValueError, match="temperature"):
        compose("stage1", ["loss.temperature=-1"])
    with pytest.raises(ValueError, match="padding_side"):
        compose("stage1", ["model.padding_side=middle"])


def test_pipeline_batch_sizes_have_one_spelling(compose, tmp_path):
    """Batch sizes are per stage in a pipeline (``stage1.engine.global_batch_size``, the spelling of
    ``make stage1``); the shared ``engine.global_batch_size`` would be silently ignored, so it is refused
    through the entry point with one line and status 2 (a ConfigError raised while the config is converted)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qwen3train.cli.main", "--config-name=pipeline",
                           "engine.global_batch_size=64", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: engine.global_batch_size is set per stage in a pipeline: stage1.engine.global_batch_size, "
        "stage2.engine.global_batch_size, rerank.engine.global_batch_size")
    from qwen3train.pipeline import Pipeline  # the per-stage spelling composes and reaches the stage's engine

    pc = compose("pipeline", ["stage2.engine.global_batch_size=48", "stage2.engine.micro_batch_tokens=900",
                              f"output_dir={tmp_path}"])
    s2 = Pipeline(pc).train_cfg(pc.stage2, "stage2", ["x.jsonl"], None)
    assert s2.engine.global_batch_size == 48 and s2.engine.backend == pc.engine.backend
    assert s2.engine.micro_batch_tokens == 900  # the fix an out-of-memory stop of stage 2 asks for, for stage 2 only
    assert Pipeline(pc).train_cfg(pc.stage1, "stage1", ["x.jsonl"], None).engine.micro_batch_tokens is None
