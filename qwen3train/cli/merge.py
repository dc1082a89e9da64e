"""Stage 3 entry point: merge checkpoints (default: the last stage-2 checkpoints) into one export.

    python -m qwen3train.cli.merge run_dir=outputs/stage2 select.last=3 method=multislerp
    python -m qwen3train.cli.merge 'inputs=[a,b]' method=slerp t=0.3
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from qwen3train.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../../configs", config_name="merge")
def main(dict_cfg: DictConfig) -> None:
    from qwen3train.merge.run import run

    run(OmegaConf.to_object(dict_cfg))


if __name__ == "__main__":
    main()
