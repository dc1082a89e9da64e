"""Formatting, end token, padding-side invariance, and encode vs an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3train.models.pooling import last_token_pool, normalize
from qwen3train.text import EmbeddingTokenizer, format_query, query_prompt

EOT = 151643
LONG = "retrieval " * 300


def test_query_format_is_the_official_string():
    assert format_query("what is rope", "Find docs") == "Instruct: Find docs\nQuery:what is rope"
    assert format_query("raw", None) == "raw" and format_query("raw", "") == "raw"
    assert query_prompt("Find docs") == "Instruct: Find docs\nQuery:"


@pytest.mark.parametrize("side", ["left", "right"])
def test_end_token_exactly_once_after_truncation(tokenizer, side):
    tok = EmbeddingTokenizer(tokenizer, padding_side=side)
    assert tok.end_id == EOT and tokenizer.eos_token_id != EOT  # never eos_token (<|im_end|>)
    texts = [LONG, "short", format_query(LONG, "Given a query"), "ends with marker<|endoftext|>"]
    ids = tok.token_ids(texts, max_length=32)
    for seq in ids:
        assert seq[-1] == EOT and seq.count(EOT) == 1
        assert len(seq) <= 32
    assert len(ids[0]) == 32 and len(ids[2]) == 32
    batch = tok(texts, 32)
    for row, m in zip(batch["input_ids"], batch["attention_mask"]):
        assert row[m.bool()].tolist().count(EOT) == 1
        assert row[m.bool()][-1].item() == EOT


def test_end_token_once_even_if_tokenizer_appends_it(tokenizer):
    from qwen3train.models.export import tokenizer_with_end_token

    appending = tokenizer_with_end_token(tokenizer, "<|endoftext|>")
    assert appending(["test"]).input_ids[0] == [1944, EOT]  # like the released tokenizer
    ids = EmbeddingTokenizer(appending).token_ids(["test", LONG], 16)
    assert ids[0] == [1944, EOT] and all(s.count(EOT) == 1 for s in ids)


def test_pooling_index_for_both_padding_sides():
    h = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_pool(h, right).flatten().tolist() == [2.0, 9.0]
    assert last_token_pool(h, left).flatten().tolist() == [4.0, 9.0]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    from qwen3train.models.build import ModelConfig, build_embedder

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_query_length=48, max_doc_length=48)
    return build_embedder(cfg)


TEXTS = ["a", "the quick brown fox jumps over the lazy dog", "rotary position embeddings",
         LONG, "x y z", "Qwen3 embedding models use last-token pooling"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_at_a_time(embedder, side):
    tok = EmbeddingTokenizer(embedder.tokenizer, padding_side=side)
    with torch.no_grad():
        batch = embedder(**tok(TEXTS, 48))
        single = torch.cat([embedder(**tok([t], 48)) for t in TEXTS])
    assert (normalize(batch) - normalize(single)).abs().max() <= 1e-5


def test_encode_equals_independent_transformers_computation(embedder, tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    got = embedder.encode(TEXTS, instruction="Find passages", batch_size=4)
    # independent: plain AutoModel, manual formatting, manual EOS, hidden state at last real token
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModel.from_pretrained(tiny_model_dir).eval()
    ref = []
    for t in TEXTS:
        ids = tok("Instruct: Find passages\nQuery:" + t, add_special_tokens=False)["input_ids"][:47] + [EOT]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        ref.append(F.normalize(hs, dim=-1))
    assert (got - torch.stack(ref)).abs().max() <= 1e-5


@pytest.mark.parametrize("dim", [32, 64])
def test_matryoshka_is_truncate_then_normalize(embedder, dim):
    full = embedder.encode(TEXTS)
    with torch.no_grad():
        raw = torch.cat([embedder(**embedder.tok([t], 48)) for t in TEXTS])
    small = embedder.encode(TEXTS, dim=dim)
    assert small.shape == (len(TEXTS), dim)
    assert (small - F.normalize(raw[:, :dim], dim=-1)).abs().max() <= 1e-5
    if dim == 64:
        assert (small - full).abs().max() <= 1e-5
