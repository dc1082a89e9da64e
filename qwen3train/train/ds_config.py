"""DeepSpeed's JSON config for a run: generated from ``EngineConfig`` (batch, accumulation, clipping, ZeRO stage,
offload, bf16 through ``torch_autocast``) and merged with the user's file (``engine.deepspeed_config``), whose
settings win except where they would contradict ours: the derived fields must agree (or say ``"auto"``), and the
precision and the optimizer stay ours. Plain data, no deepspeed import (``train.deepspeed_engine`` runs it)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from qwen3train.errors import ConfigError

# fields derived from EngineConfig: key -> the setting it comes from (named in conflict errors)
_DERIVED = {
    "train_batch_size": "engine.global_batch_size",
    "train_micro_batch_size_per_gpu": "engine.micro_batch_size",
    "gradient_accumulation_steps": "engine.global_batch_size / (processes x engine.micro_batch_size)",
    "gradient_clipping": "engine.grad_clip",
}


def _is_auto(value) -> bool:
    if isinstance(value, dict):
        return all(_is_auto(v) for k, v in value.items() if k != "type")
    return value == "auto"


def merge_deepspeed_config(ours: dict, user: dict, source: str, precision: str) -> dict:
    """``user`` (a DeepSpeed JSON) merged into ``ours``: user keys win except the derived ones,
    which must agree (or say ``"auto"``); precision and the optimizer are ours (one rule for both
    engines, a client optimizer and schedule), so a file that sets them differently is refused."""

    def conflict(key: str, theirs, setting: str, mine) -> ConfigError:
        return ConfigError(f"engine.deepspeed_config={source}: \"{key}\": {json.dumps(theirs)} conflicts with "
                           f"{setting} (= {json.dumps(mine)}); remove it, set it to \"auto\", or change {setting}")

    merged = copy.deepcopy(ours)
    for key, value in user.items():
        if key in _DERIVED:
            if value != "auto" and value != ours[key]:
                raise conflict(key, value, _DERIVED[key], ours[key])
        elif key in ("optimizer", "scheduler"):
            if not _is_auto(value.get("params", {})):
                raise ConfigError(f"engine.deepspeed_config={source}: \"{key}\" is set by optim.* (AdamW and its "
                                  f"schedule are handed to DeepSpeed); remove \"{key}\" or make its params \"auto\"")
        elif key in ("bf16", "fp16", "torch_autocast"):
            enabled = value.get("enabled", False) if isinstance(value, dict) else value
            if enabled == "auto" or enabled is False:
                continue
            wants = "bf16" if key in ("bf16", "torch_autocast") and value.get("dtype", "bfloat16") in (
                "bfloat16", "bf16", "torch.bfloat16") else "fp16"
            if wants != precision:
                raise conflict(f"{key}.enabled", enabled, "engine.precision (resolved)", precision)
        elif key == "zero_optimization":
            zero = merged.setdefault("zero_optimization", {})
            for zkey, zval in value.items():
                if zkey == "stage" and zval != "auto" and zval != ours["zero_optimization"]["stage"]:
                    raise conflict("zero_optimization.stage", zval, "engine.zero_stage",
                                   ours["zero_optimization"]["stage"])
                if zkey == "offload_optimizer" and "offload_optimizer" in zero:
                    device_ = zval.get("device", "none") if isinstance(zval, dict) else zval
                    if device_ in (None, "none"):
                        raise conflict("zero_optimization.offload_optimizer.device", device_,
                                       "engine.offload_optimizer", True)
                if zkey != "stage" and zval != "auto":
                    zero[zkey] = zval
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg, world: int, precision: str) -> dict:
    """The DeepSpeed config of a run: generated from ``cfg`` (``train.engine.EngineConfig``), merged with the
    user's file."""
    gas, rows = cfg.micro_steps(world), cfg.micro_rows(world)
    zero = {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ours = {
        "train_batch_size": rows * gas * world,
        "train_micro_batch_size_per_gpu": rows,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ours["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if not cfg.deepspeed_config:
        return ours
    path = Path(cfg.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"engine.deepspeed_config={path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.deepspeed_config={path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.deepspeed_config={path}: must hold a JSON object")
    return merge_deepspeed_config(ours, user, str(path), precision)


def offloads_optimizer(ds_config: dict) -> bool:
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer")
    return isinstance(off, dict) and off.get("device", "none") in ("cpu", "nvme")
