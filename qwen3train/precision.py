"""Numeric precision: which hardware computes bf16 natively, and the one training rule.

The training rule, for both engines (plain torch / DDP and DeepSpeed ZeRO-1/2/3) and both devices:

* trainable weights, their gradients and the optimizer state are **float32** (master weights);
* the forward and backward passes compute in **bf16 through autocast** when the run's compute
  precision is bf16 (CUDA with bf16, and CPUs with native bf16 dot products: AVX512-BF16, AMX, Arm BF16);
* ``model.dtype`` is the dtype of **exports and inference**, not of training: a bf16 model trains
  with fp32 masters and is written back in bf16.

Pure bf16 weights with AdamW lose most updates at the learning rates contrastive fine-tuning uses
(a bf16 weight of magnitude 0.02 has a spacing of ~1e-4; an Adam step at lr 1e-5 is ~1e-5), which is
why weights are never trained in bf16 here. fp16 compute is not offered: it needs loss scaling, and
every GPU this project targets computes bf16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from qwen3train.errors import ConfigError

TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
# One vocabulary for every precision setting (training, evaluation, mining, filtering, MTEB, merge
# selection, personas): auto | bf16 | fp32 | fp16, with torch's dtype names accepted for the same.
PRECISION_NAMES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32",
                   "fp16": "fp16", "float16": "fp16"}
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "auto": "auto"}


def precision_name(value, key: str, training: bool = False) -> str:
    """``value`` in the one vocabulary (``bfloat16`` -> ``bf16``, ``float32`` -> ``fp32``...), or a
    ValueError naming ``key`` and the choices. ``training``: fp16 is not offered (no loss scaling)."""
    name = PRECISION_NAMES.get(str(value).strip().lower())
    if name is None or (training and name == "fp16"):
        choices = "auto, bf16 (or bfloat16), fp32 (or float32)" + ("" if training else ", fp16 (or float16)")
        raise ValueError(f"{key} must be one of: {choices}; got {value!r}")
    return name


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (oneDNN then runs bf16 GEMMs at 2-4x fp32)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(device_type: str | None = None) -> bool:
    """Whether ``device_type`` (default: the training device, CUDA when present) computes bf16 natively."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_train_precision(precision: str, model_dtype: str, device_type: str | None = None) -> str:
    """-> ``"bf16"`` or ``"fp32"``: the compute precision of a training run.

    ``auto``: bf16 when the model is a bf16 model (``model.dtype: bfloat16``, as the Qwen3 configs
    are) and the device computes bf16 natively; fp32 otherwise (the tiny test model is float32).
    ``bf16`` / ``fp32`` force it; bf16 on a CUDA device without bf16 is an error.
    """
    precision = precision_name(precision, "engine.precision", training=True)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "fp32":
        return "fp32"
    if precision == "bf16":
        if device_type == "cuda" and not native_bf16("cuda"):
            raise ConfigError("engine.precision=bf16: this GPU does not compute bf16; use engine.precision=fp32")
        return "bf16"
    return "bf16" if model_dtype == "bfloat16" and native_bf16(device_type) else "fp32"
