"""engine.deepspeed_config: a user's DeepSpeed JSON merged with the fields derived from the engine
settings; a conflict is a one-line error naming both values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from qwen3train.errors import ConfigError
from qwen3train.train.ds_config import deepspeed_config
from qwen3train.train.engine import EngineConfig


def _cfg(tmp_path, user: dict, **kw) -> EngineConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    return EngineConfig(backend="deepspeed", zero_stage=2, micro_batch_size=4, global_batch_size=32,
                        deepspeed_config=str(path), **kw)


def test_user_keys_are_merged_and_auto_takes_ours(tmp_path):
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": "auto", "reduce_bucket_size": 5e7, "offload_param": {"device": "none"}},
            "bf16": {"enabled": "auto"}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "comms_logger": {"enabled": True}, "steps_per_print": 50}
    ds = deepspeed_config(_cfg(tmp_path, user), world=2, precision="bf16")
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (2 processes x 4)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert ds["zero_optimization"]["offload_param"] == {"device": "none"}
    assert ds["comms_logger"] == {"enabled": True} and ds["steps_per_print"] == 50
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # precision is ours
    assert "optimizer" not in ds and "bf16" not in ds


@pytest.mark.parametrize("user,needle", [
    ({"train_micro_batch_size_per_gpu": 8}, r'"train_micro_batch_size_per_gpu": 8 conflicts with engine.micro_batch_size \(= 4\)'),
    ({"gradient_accumulation_steps": 1}, r'"gradient_accumulation_steps": 1 conflicts with .* \(= 4\)'),
    ({"train_batch_size": 64}, r'"train_batch_size": 64 conflicts with engine.global_batch_size \(= 32\)'),
    ({"zero_optimization": {"stage": 3}}, r'"zero_optimization.stage": 3 conflicts with engine.zero_stage \(= 2\)'),
    ({"gradient_clipping": 0.5}, r'"gradient_clipping": 0.5 conflicts with engine.grad_clip \(= 1.0\)'),
    ({"bf16": {"enabled": True}}, r'"bf16.enabled": true conflicts with engine.precision \(resolved\) \(= "fp32"\)'),
    ({"fp16": {"enabled": True}}, r'"fp16.enabled": true conflicts with engine.precision'),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}}, r'"optimizer" is set by optim\.\*'),
])
def test_conflicts_name_both_values(tmp_path, user, needle):
    with pytest.raises(ConfigError, match=needle):
        deepspeed_config(_cfg(tmp_path, user), world=2, precision="fp32")


def test_offload_conflict_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"offload_optimizer.device\": \"none\" conflicts with engine.offload_optimizer"):
        deepspeed_config(_cfg(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "none"}}},
                              offload_optimizer=True), world=1, precision="fp32")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 32,\n  "oops"\n}')
    with pytest.raises(ConfigError, match=r"bad.json:3: not valid JSON"):
        deepspeed_config(EngineConfig(backend="deepspeed", deepspeed_config=str(bad)), world=1, precision="fp32")
    with pytest.raises(ConfigError, match="no such file"):
        deepspeed_config(EngineConfig(backend="deepspeed", deepspeed_config=str(tmp_path / "nope.json")), world=1,
                         precision="fp32")
    with pytest.raises(ValueError, match="needs a DeepSpeed engine"):
        EngineConfig(backend="torch", deepspeed_config=str(bad))


@pytest.mark.slow
def test_user_config_through_the_cli(tiny_model_dir, tmp_path):
    """The real entry point: a user file is merged into what DeepSpeed runs (and recorded in the run
    folder); a conflicting file stops the run with one line and exit status 2, no traceback."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs

    data = make_pairs(tmp_path / "d.jsonl", n=32, k=2)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "steps_per_print": 1000,
                                "zero_optimization": {"reduce_bucket_size": 1000000}}))
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def cli(out, path):
        cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", "engine=zero2",
               "engine.precision=fp32", f"engine.deepspeed_config={path}", "engine.micro_batch_size=8",
               "engine.global_batch_size=16", "run.max_steps=2", f"run.output_dir={out}",
               f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{data}]"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)

    proc = cli(tmp_path / "good", good)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = json.loads((tmp_path / "good" / "deepspeed_config.json").read_text())
    assert ran["steps_per_print"] == 1000 and ran["zero_optimization"]["reduce_bucket_size"] == 1000000
    assert ran["train_micro_batch_size_per_gpu"] == 8 and ran["gradient_accumulation_steps"] == 2
    assert len((tmp_path / "good" / "metrics.jsonl").read_text().splitlines()) == 2

    proc = cli(tmp_path / "bad", bad)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "2 conflicts with engine.micro_batch_size (= 8)" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_micro_batch_above_the_per_process_batch_is_capped_to_it():
    """engine.micro_batch_size is a ceiling: global 8 on 2 processes runs 4-row forwards in one step (and DeepSpeed
    is told so: its batch fields must multiply to the global batch). `make smoke NGPU=2` stopped at stage 2 with a
    ValueError traceback before; a split that really does not divide is a one-line ConfigError."""
    cfg = EngineConfig(backend="deepspeed", micro_batch_size=8, global_batch_size=8)
    assert (cfg.micro_rows(2), cfg.micro_steps(2)) == (4, 1)
    assert (cfg.micro_rows(1), cfg.micro_steps(1)) == (8, 1)
    ds = deepspeed_config(cfg, world=2, precision="fp32")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 4, 1)
    assert EngineConfig(micro_batch_size=4, global_batch_size=32).micro_steps(2) == 4
    with pytest.raises(ConfigError, match="per-process batch 12 .* not divisible by engine.micro_batch_size=8"):
        EngineConfig(micro_batch_size=8, global_batch_size=24).micro_steps(2)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        EngineConfig(micro_batch_size=8, global_batch_size=8).micro_steps(3)


def test_compiled_layers_are_left_off_under_zero3_unless_asked(monkeypatch, capsys):
    """Under ZeRO-3, dynamo traces DeepSpeed's gather/free hooks inside each compiled layer and recompiles to its
    limit (50 recompilations a process in 2 steps of the tiny model, then eager): model.compile's auto (on for CUDA) is off
    there, said once; an explicit true is kept with a warning naming the way out; other engines keep the setting as
    it is. Would catch: ZeRO-3 runs compiling by default on a GPU, the run's own config changed (its identity), a
    user's explicit choice overridden, or ZeRO-1/2 and FSDP (which compile well) switched off."""
    import torch

    from qwen3train.models.build import ModelConfig
    from qwen3train.train.build import compile_under
    from qwen3train.train.engine import EngineConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = ModelConfig(compile=None)
    got = compile_under(auto, EngineConfig(backend="deepspeed", zero_stage=3))
    assert got.compile is False and auto.compile is None
    assert "note: model.compile (auto) is off under engine=zero3" in capsys.readouterr().out
    asked = ModelConfig(compile=True)
    assert compile_under(asked, EngineConfig(backend="deepspeed", zero_stage=3)) is asked
    assert "warning: model.compile=true under engine=zero3" in capsys.readouterr().out
    for engine in (EngineConfig(backend="deepspeed", zero_stage=2), EngineConfig(backend="fsdp"), EngineConfig()):
        assert compile_under(auto, engine) is auto
    assert capsys.readouterr().out == ""
