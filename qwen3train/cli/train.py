"""Stage 1 / stage 2 training entry point.

    python -m qwen3train.cli.train --config-name=stage1 model=tiny engine.global_batch_size=64
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from qwen3train.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../../configs", config_name="stage1")
def main(dict_cfg: DictConfig) -> None:
    from qwen3train.train.loop import run

    cfg = OmegaConf.to_object(dict_cfg)
    run(cfg)


if __name__ == "__main__":
    main()
