"""Losses, one per file, listed in one dict: adding a loss is one file and one line here."""

from __future__ import annotations

from qwen3train.losses.infonce import InfoNCEConfig, build_infonce
from qwen3train.losses.rerank import RerankLossConfig, build_rerank_loss
from qwen3train.errors import ConfigError

LOSSES = {"infonce": build_infonce, "rerank": build_rerank_loss}


def build_loss(cfg):
    """Look the implementation up by the config's ``name``."""
    if cfg.name not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.name!r}; known: {sorted(LOSSES)}")
    return LOSSES[cfg.name](cfg)


__all__ = ["LOSSES", "InfoNCEConfig", "RerankLossConfig", "build_loss"]
