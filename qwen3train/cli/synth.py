"""Stage 0 entry point: synthetic pairs.

    python -m qwen3train.cli.synth corpus=[docs.jsonl] backend=vllm generator=Qwen/Qwen3-32B
    python -m qwen3train.cli.synth ... shard_index=$SLURM_ARRAY_TASK_ID num_shards=64
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from qwen3train.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../../configs", config_name="synth")
def main(dict_cfg: DictConfig) -> None:
    from qwen3train.synth.pipeline import run

    run(OmegaConf.to_object(dict_cfg))


if __name__ == "__main__":
    main()
