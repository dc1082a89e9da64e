"""model.attn_implementation: flash_attention_2 where it can run, a logged fallback to sdpa where not."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch


def test_flash_attention_2_falls_back_to_sdpa_with_a_log(tiny_model_dir, caplog):
    """Without the flash_attn package (or without CUDA) the model still builds, on sdpa, and says why.
    Catches the ImportError transformers raises when flash_attention_2 is passed through blindly."""
    from qwen3train.models.build import ModelConfig, build_embedder

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="flash_attention_2", packing=False)
    with caplog.at_level(logging.WARNING, logger="qwen3train.models.build"):
        emb = build_embedder(cfg)
    assert emb.backbone.config._attn_implementation == "sdpa"
    msg = [r.getMessage() for r in caplog.records if "flash_attention_2 unavailable" in r.getMessage()]
    assert len(msg) == 1 and "using sdpa" in msg[0]
    ref = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir)))
    texts = ["gravity pulls", "a rope"]
    assert torch.allclose(emb.encode(texts), ref.encode(texts), atol=1e-6)


def test_flash_attention_2_kept_where_it_can_run(monkeypatch):
    """With flash_attn installed and CUDA present the choice is kept (faked here: no GPU in CI)."""
    from qwen3train.models import build

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build.resolve_attn_implementation("flash_attention_2") == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build.resolve_attn_implementation("flash_attention_2") == "sdpa"


def test_unknown_attention_is_a_config_error(compose):
    with pytest.raises(Exception, match="attn_implementation must be one of"):
        compose("stage1", ["model.attn_implementation=flash2"])
