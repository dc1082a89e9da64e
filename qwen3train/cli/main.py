"""The one command-line entry point: Hydra composes the primary config (one per make target), the
typed object is converted once, and its schema type picks what runs.

    python -m qwen3train.cli.main --config-name=stage1 engine.global_batch_size=64
    torchrun --nproc_per_node 8 -m qwen3train.cli.main --config-name=stage2 engine=zero3
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from qwen3train.config import register_configs, runner_for

register_configs()


@hydra.main(version_base="1.3", config_path="../../configs", config_name="stage1")
def main(dict_cfg: DictConfig) -> None:
    cfg = OmegaConf.to_object(dict_cfg)
    runner_for(cfg)(cfg)


if __name__ == "__main__":
    main()
