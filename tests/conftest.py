"""Shared fixtures: offline environment, the tiny Qwen3 built once per session, Hydra compose."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# record indexes of test data go to a folder of this session (subprocesses inherit it), not ~/.cache
os.environ.setdefault("QWEN3TRAIN_INDEX_DIR", tempfile.mkdtemp(prefix="qwen3train-index-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # optional (evaluation and benchmarks); tests read FIXTURES
FIXTURES = REPO / "tests" / "fixtures" / "collections"  # real cuts of ../shared/data (build_fixtures.py)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qwen3train.models.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from qwen3train.models.build import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def model_cfg(tiny_model_dir):
    from qwen3train.models.build import ModelConfig

    return ModelConfig(name="tiny", name_or_path=str(tiny_model_dir), max_query_length=64, max_doc_length=64)


@pytest.fixture()
def compose():
    """compose(config_name, overrides) -> the typed config object, as the CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from qwen3train.config import register_configs

    register_configs()

    def _compose(name: str, overrides: list[str] | None = None):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=overrides or [])
        return OmegaConf.to_object(cfg)

    return _compose
