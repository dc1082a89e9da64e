"""The one command-line entry point: Hydra composes the primary config (one per make target), the
typed object is converted once, and its schema type picks what runs.

    python -m qwen3train.cli.main --config-name=stage1 engine.global_batch_size=64
    torchrun --nproc_per_node 8 -m qwen3train.cli.main --config-name=stage2 engine=zero3
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from qwen3train.config import register_configs, runner_for

register_configs()


@hydra.main(version_base="1.3", config_path="../../configs", config_name="stage1")
def main(dict_cfg: DictConfig) -> None:
    from qwen3train.data.records import DataError
    from qwen3train.errors import ConfigError

    cfg = OmegaConf.to_object(dict_cfg)
    try:
        runner_for(cfg)(cfg)
    except (ConfigError, DataError) as e:  # a user's mistake: one line, status 2; tracebacks are for bugs
        if os.environ.get("QWEN3TRAIN_DEBUG") == "1":
            raise
        rank = os.environ.get("RANK")
        print(f"error{f' (rank {rank})' if rank and os.environ.get('WORLD_SIZE', '1') != '1' else ''}: {e}",
              file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
