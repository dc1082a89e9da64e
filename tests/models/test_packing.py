"""Padding-free (packed) forward: the same vectors, logits and gradients as padded batches for three
backbone families, no attention across sequences, filler segments that change nothing, token-budget
chunks, and one compiled graph for every packed length."""

from __future__ import annotations

import pytest
import torch

from qwen3train.models.build import ModelConfig, build_embedder, build_reranker
from qwen3train.models.packed_attention import agrees_with_exact
from qwen3train.models.packing import pack, pack_rows, share_groups
from qwen3train.text import format_query
from qwen3train.train.task import token_chunks

WORDS = ["alpha", "beta", "gamma", "delta", "rope", "tensor", "ocean", "violin"]
TEXTS = [" ".join(WORDS[(i * 3 + k) % 8] for i in range(2 + 5 * (k % 6) + k)) for k in range(14)]


def _family_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    from qwen3train.models.tiny import tiny_qwen3_config

    common = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=True)
    if family == "qwen3":
        return tiny_qwen3_config()
    if family == "qwen2":  # Qwen2.5's architecture: q/k/v biases, no q/k norms
        return Qwen2Config(**common)
    return LlamaConfig(**common, head_dim=32)  # SmolLM2's architecture


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_model_dir):
    """Random tiny decoders of the three families (real Qwen3 tokenizer), one folder each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("packing-families")
    out = {}
    for family in ("qwen3", "qwen2", "llama"):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(_family_config(family))
        model.save_pretrained(root / family)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / family)
        out[family] = root / family
    return out


def _pair(path, **kw):
    """(padded, packed) embedders with the same weights, built for fp32 training."""
    models = []
    for packing in (False, True):
        cfg = ModelConfig(name_or_path=str(path), max_query_length=96, max_doc_length=96, packing=packing, **kw)
        models.append(build_embedder(cfg, train_precision="fp32"))
    return models


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("family,rows,share", [("qwen3", 1, 0), ("qwen3", 3, 0), ("qwen2", 1, 0), ("llama", 3, 0),
                                               ("qwen2", 1, 8), ("llama", 2, 8)])
def test_packed_equals_padded_vectors_and_gradients(family_models, family, rows, share):
    """fp32, every family, one packed row or several (model.pack_tokens), without and with shared prefixes
    (these texts repeat a word cycle, so many share their first 8+ tokens): pooled vectors and every
    parameter's gradient agree to 1e-5. Catches positions that do not restart per sequence (rotary
    sees offsets) or do not continue after a shared prefix, a wrong last-token index or row order, and a
    backend that drops gradients on the way through the scatter into the attention block."""
    padded, packed = _pair(family_models[family], pack_tokens=0 if rows == 1 else 120, share_prefix=share)
    ids = padded.tok.token_ids(TEXTS, 96)
    assert len({len(x) for x in ids}) > 8  # the lengths really differ
    weight = torch.linspace(-1, 1, padded.hidden_size)
    out_ref = padded(**padded.tok.pad(ids))
    (out_ref * weight).sum().backward()
    p = packed.pack(ids)
    assert len(p.rows) == rows if rows == 1 else len(p.rows) >= rows
    width = sum(r.input_ids.shape[1] for r in p.rows)
    assert width == sum(map(len, ids)) if not share else width < 0.9 * sum(map(len, ids))  # no padding; shared
    out = packed(**p.inputs("cpu"))
    (out * weight).sum().backward()
    assert _close(out, out_ref), (out - out_ref).abs().max()
    g_ref, g = _grads(padded), _grads(packed)
    assert set(g) == set(g_ref) and len(g_ref) > 10
    for name in g_ref:
        assert _close(g[name], g_ref[name]), name


def _leak(backbone, seqs, pad_id, packed_kwargs, grouped=True):
    """(max change of sequence 1's hidden states when sequence 0's tokens change, max |d seq1 / d embeddings
    of seq 0|) for one packed row (longer sequence first)."""
    p = pack(seqs, pad_id, grouped=grouped)
    n0 = len(seqs[0])
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["emb"] = out

    handle = backbone.get_input_embeddings().register_forward_hook(keep)
    h = backbone(**packed_kwargs(p), use_cache=False).last_hidden_state[0]
    h[n0:].sum().backward()
    grad_into_first = captured["emb"].grad[0, :n0].abs().max().item()
    handle.remove()
    other = [[t + 7 for t in seqs[0]], seqs[1]]
    with torch.no_grad():
        h2 = backbone(**packed_kwargs(pack(other, pad_id, grouped=grouped)), use_cache=False).last_hidden_state[0]
    return (h2[n0:] - h[n0:].detach()).abs().max().item(), grad_into_first


def test_a_packed_sequence_never_attends_to_another(tiny_model_dir):
    """Every position of the second sequence is unchanged when the first sequence's tokens change, and
    receives no gradient path from it. The same check run on a leaky variant (plain causal attention
    over the whole row, positions restarted) reports the leak, so this test fails if the mask leaks."""
    emb = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir)), train_precision="fp32")
    seqs = [list(range(100, 117)), list(range(300, 311))]
    change, grad = _leak(emb.backbone, seqs, emb.tok.pad_id, lambda p: p.inputs("cpu"))
    assert change == 0.0 and grad == 0.0
    change, grad = _leak(emb.backbone, seqs, emb.tok.pad_id, lambda p: p.inputs("cpu"), grouped=False)
    assert change == 0.0 and grad == 0.0
    leaky = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), packing=False), train_precision="fp32")
    # an all-ones mask: causal over the whole row (transformers' own packed detection needs no mask)
    change, grad = _leak(leaky.backbone, seqs, emb.tok.pad_id, lambda p: {
        "input_ids": p.input_ids, "position_ids": p.position_ids, "attention_mask": torch.ones_like(p.input_ids)})
    assert change > 1e-3 and grad > 1e-6


def test_flex_backend_forward_equals_padded_on_cpu(tiny_model_dir):
    """FlexAttention with the same-sequence causal block mask (the CUDA path without flash-attn) runs its
    forward on the CPU too: same vectors as the exact path. (FlexAttention has no CPU backward; the
    CUDA backward is measured by make gpu-check.)"""
    exact = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), max_doc_length=96))
    flex = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), max_doc_length=96, packed_attention="flex"))
    assert flex.packing == "flex" and exact.packing == "padded"
    assert _close(flex.encode(TEXTS), exact.encode(TEXTS), 1e-5)


def test_flex_cannot_train_on_cpu_is_a_config_error(tiny_model_dir):
    from qwen3train.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot train on the CPU"):
        build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), packed_attention="flex"), train_precision="fp32")


def test_fp32_compute_never_gets_a_flash_kernel():
    """FlashAttention kernels (flash-attn, torch's varlen) take bf16/fp16 only: the first H200 run died in
    every fp32 run (the 2-process check) with "FlashAttention only support fp16 and bf16". ``auto`` must
    pick FlexAttention for fp32 compute, and an explicit varlen/flash with fp32 is a config error."""
    from qwen3train.errors import ConfigError
    from qwen3train.models.build import half_compute
    from qwen3train.models.packed_attention import resolve_backend

    assert resolve_backend("auto", "cuda", training=True, half=False) == "flex"
    for name in ("varlen", "flash"):
        with pytest.raises(ConfigError, match="needs bf16/fp16 compute"):
            resolve_backend(name, "cuda", training=True, half=False)
    cfg = ModelConfig(name_or_path="x", dtype="float32")
    assert not half_compute(cfg, "fp32") and half_compute(cfg, "bf16") and not half_compute(cfg, None)
    assert half_compute(ModelConfig(name_or_path="x", dtype="bfloat16"), None)


def test_varlen_gets_one_half_dtype_under_autocast(monkeypatch):
    """Under bf16 autocast with fp32 master weights, Qwen3's q/k norms hand fp32 queries and keys to the
    attention (fp32 weight x bf16 activation) while values are bf16; torch's varlen kernel (a CUDA
    kernel, replaced here by a recorder) must receive all three in the autocast dtype (the first H200
    run failed every packed row on the old code). Without autocast and without a half input it refuses."""
    import torch.nn.attention.varlen as varlen

    from qwen3train.models.packed_attention import varlen_packed_attention

    seen = []

    def recorder(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.zeros_like(q)

    monkeypatch.setattr(varlen, "varlen_attn", recorder)
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = varlen_packed_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=4)
    assert seen == [(torch.bfloat16,) * 3] and out.shape == (1, 6, 4, 8)
    varlen_packed_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=4)  # v is bf16
    assert seen[-1] == (torch.bfloat16,) * 3
    with pytest.raises(RuntimeError, match="needs bf16/fp16 compute"):
        varlen_packed_attention(None, q, k, v.float(), None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=4)


def test_filler_segments_change_nothing(tiny_model_dir):
    """pack_multiple rounds the row up with pad segments of their own: the real sequences' vectors and
    gradients stay the same (a filler that joined a real sequence would change its last token)."""
    plain, filled = (build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), max_doc_length=96,
                                                pack_multiple=m), train_precision="fp32") for m in (1, 64))
    ids = plain.tok.token_ids(TEXTS, 96)
    p1, p64 = plain.pack(ids), filled.pack(ids)
    assert all(r.input_ids.shape[1] % 64 == 0 for r in p64.rows)
    assert sum(r.input_ids.shape[1] for r in p64.rows) > sum(r.input_ids.shape[1] for r in p1.rows)
    assert p64.num_tokens == p1.num_tokens
    a = plain(**p1.inputs("cpu"))
    b = filled(**p64.inputs("cpu"))
    a.sum().backward()
    b.sum().backward()
    assert _close(a, b)
    ga, gb = _grads(plain), _grads(filled)
    assert all(_close(gb[k], ga[k]) for k in ga)


def test_packed_encode_equals_padded_encode(tiny_model_dir):
    """encode() (evaluation, filtering, mining, personas) packs texts by a token budget: same vectors, in
    input order, whether one text or the whole block fits a pack."""
    padded = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), packing=False))
    packed = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir)))
    ref = padded.encode(TEXTS, batch_size=4)
    for budget in (1, 50, 10**6):
        assert _close(packed.encode(TEXTS, batch_tokens=budget), ref)
    assert _close(packed.encode(TEXTS[:3], instruction="Find it"), padded.encode(TEXTS[:3], instruction="Find it"))


@pytest.mark.parametrize("with_lse", [False, True])
def test_packed_reranker_equals_padded(tiny_model_dir, with_lse):
    """Reranker: yes/no logits (and the whole-vocabulary logsumexp the SFT loss uses) at each sequence's own
    last position, and the gradients, equal the padded (left-padded, official) batch."""
    models = [build_reranker(ModelConfig(name_or_path=str(tiny_model_dir), packing=p), max_length=128,
                             train_precision="fp32") for p in (False, True)]
    pairs = [("what is gravity", TEXTS[k]) for k in range(6)]
    ids = models[0].token_ids([q for q, _ in pairs], [d for _, d in pairs])
    outs = []
    for rr in models:
        z = rr(**rr.inputs(ids), with_logsumexp=with_lse)
        (z * torch.arange(1, z.shape[1] + 1)).sum().backward()
        outs.append((z.detach(), _grads(rr)))
    (z_ref, g_ref), (z, g) = outs
    assert z.shape == (6, 3 if with_lse else 2)
    assert _close(z, z_ref)
    assert all(_close(g[k], g_ref[k]) for k in g_ref)
    assert torch.allclose(models[1].score("what is gravity", TEXTS[:6]), models[0].score("what is gravity", TEXTS[:6]),
                          atol=1e-6)


def test_share_groups_save_the_most_tokens():
    """Per-query groups (prompt + query shared by 4 documents) beat one group on the prompt alone; a
    sequence that is all prefix keeps one token of its own; a prefix under the threshold is not shared;
    sequences without a partner stay alone. Catches a greedy grouping on the common prompt (saves less),
    an empty remainder, and sharing below the threshold."""
    prompt = list(range(1000, 1040))  # 40 tokens every sequence starts with
    seqs = []
    for q in range(3):
        query = [2000 + 10 * q + k for k in range(20)]
        seqs += [prompt + query + [3000 + 100 * q + 10 * d + k for k in range(5 + d)] for d in range(4)]
    seqs.append([9, 9, 9])
    groups = share_groups(seqs, 16)
    assert sorted(groups) == [(60, [0, 1, 2, 3]), (60, [4, 5, 6, 7]), (60, [8, 9, 10, 11])]
    assert share_groups([[1] * 20, [1] * 25], 16) == [(19, [0, 1])]  # the shorter keeps its last token
    assert share_groups([[1] * 10 + [2], [1] * 10 + [3]], 16) == []
    assert share_groups([[5] * 30], 16) == []


def _shared_and_unshared(tiny_model_dir, **kw):
    return [build_reranker(ModelConfig(name_or_path=str(tiny_model_dir), share_prefix=share, **kw), max_length=128,
                           train_precision="fp32") for share in (0, 16)]


@pytest.mark.parametrize("rows", [1, 2])
def test_shared_prefix_reranker_equals_unshared(tiny_model_dir, rows):
    """Three queries x four documents (the listwise training layout) and two documents of a fourth query:
    with the prompt + instruction + query of each query run once, the yes/no logits and every gradient equal
    the unshared packed forward (itself equal to the padded batch, test above), in one packed row and split
    into two (a group is never split). The pack really computes fewer tokens. Catches remainders at
    positions restarting at 0 (rotary), a remainder that does not see its prefix or sees another's, and a
    prefix whose gradient is taken from one sequence instead of the sum over its group."""
    plain, shared = _shared_and_unshared(tiny_model_dir, pack_tokens=0 if rows == 1 else 300)
    queries = ["what is gravity", "who wrote the violin sonata", "ocean tensor rope", "alpha"]
    # an instruction of its own per query (else the prompt shared by all fourteen saves the most: one group)
    instr = [f"{topic} questions: retrieve the passages that answer the query in full detail"
             for topic in ("Physics", "Music", "Oceanography", "Greek")]
    pairs = [(k, TEXTS[(3 * k + d) % 14]) for k in range(3) for d in range(4)] + [(3, TEXTS[5]), (3, TEXTS[9])]
    ids = plain.token_ids([queries[k] for k, _ in pairs], [d for _, d in pairs], [instr[k] for k, _ in pairs])
    packed = shared.pack(ids)
    assert len(packed.rows) == 1 if rows == 1 else len(packed.rows) >= 2
    assert sum(int((r.parent < 0).sum()) for r in packed.rows) == 4  # one prefix segment per query
    assert sum(r.input_ids.shape[1] for r in packed.rows) < 0.7 * sum(map(len, ids))
    assert all(r.shared for r in packed.rows)
    outs = []
    for rr in (plain, shared):
        z = rr(**rr.inputs(ids))
        (z * torch.tensor([1.0, -2.0])).sum().backward()
        outs.append((z.detach(), _grads(rr)))
    (z_ref, g_ref), (z, g) = outs
    assert _close(z, z_ref), (z - z_ref).abs().max()
    assert set(g) == set(g_ref) and all(_close(g[k], g_ref[k]) for k in g_ref)
    assert torch.allclose(shared.score(queries[0], TEXTS[:10]), plain.score(queries[0], TEXTS[:10]), atol=1e-6)
    one_group = shared.pack(plain.token_ids(["alpha"] * 5, TEXTS[:5])).rows[0]
    assert one_group.parent.tolist() == [-1, 0, 0, 0, 0, 0]  # the common prompt + query: one prefix


def test_shared_instruction_embedder_equals_unshared(tiny_model_dir):
    """Queries under one instruction share it: the vectors and gradients equal the unshared forward, and a
    sequence that is nothing but the common prefix plus one token is pooled at that token."""
    models = [build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), share_prefix=share, max_query_length=96,
                                         max_doc_length=96), train_precision="fp32") for share in (0, 16)]
    instr = "Given a web search query, retrieve relevant passages that answer the query"
    ids = models[0].tok.token_ids([format_query(t, instr) for t in TEXTS[:6]] + TEXTS[6:10], 96)
    assert models[1].pack(ids).rows[0].shared
    outs = []
    for emb in models:
        v = emb(**emb.pack(ids).inputs("cpu"))
        (v * torch.linspace(-1, 1, v.shape[1])).sum().backward()
        outs.append((v.detach(), _grads(emb)))
    assert _close(outs[1][0], outs[0][0])
    assert all(_close(outs[1][1][k], outs[0][1][k]) for k in outs[0][1])


def test_shared_prefix_attention_backends_agree_on_cpu():
    """The flex backend's mask with shared prefixes (the CUDA path without varlen) gives the exact path's
    output on the CPU (forward; FlexAttention has no CPU backward); the same check is what turns sharing
    on for torch's varlen attention on a GPU. A wrong mask (remainders that miss their prefix) is told apart."""
    assert agrees_with_exact("flex", "cpu", torch.float32) is None
    seqs = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9], [5, 5, 5, 5]]
    good = pack(seqs, 0, "flex", share=3)
    assert good.parent.tolist().count(-1) == 2  # the prefix and the lone sequence
    blind = pack(seqs, 0, "flex", share=3)
    blind.parent = torch.full_like(blind.parent, -1)  # remainders that see only themselves
    q = torch.randn(1, 4, good.input_ids.shape[1], 16)
    from qwen3train.models.packed_attention import flex_packed_attention, padded_attention

    ref = padded_attention(None, q, q, q, None, scaling=0.25,
                           **{k: v for k, v in pack(seqs, 0, share=3).inputs("cpu").items() if k.startswith("packed")})[0]
    out = flex_packed_attention(None, q, q, q, None, scaling=0.25, block_mask=good.inputs("cpu")["block_mask"])[0]
    wrong = flex_packed_attention(None, q, q, q, None, scaling=0.25, block_mask=blind.inputs("cpu")["block_mask"])[0]
    assert (out - ref).abs().max() < 1e-5 and (wrong - ref).abs().max() > 1e-2
    with pytest.raises(ValueError, match="shared prefixes need"):
        pack(seqs, 0, "padded", grouped=False, share=3)
    rows = pack_rows(seqs * 3, 0, share=3, max_tokens=12)
    assert sorted(rows.order.tolist()) == list(range(9))


def test_token_chunks():
    """Budgets respected, a long unit alone, exactly n chunks on request (split by tokens, none empty),
    and an impossible n refused."""
    tokens = [5, 5, 5, 30, 2, 2, 2, 2]
    chunks = token_chunks(tokens, 10)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 3), (3, 4), (4, 8)]
    for n in range(len(chunks), len(tokens) + 1):
        got = token_chunks(tokens, 10, n)
        assert len(got) == n and got[0].start == 0 and got[-1].stop == len(tokens)
        assert all(a.stop == b.start for a, b in zip(got, got[1:])) and all(c.stop > c.start for c in got)
        assert all(sum(tokens[c]) <= 10 or c.stop - c.start == 1 for c in got)
    with pytest.raises(ValueError):
        token_chunks(tokens, 10, 3)
    with pytest.raises(ValueError):
        token_chunks(tokens, 10, 9)


def test_one_compiled_graph_serves_every_packed_length(tiny_model_dir):
    """Regional compilation with dynamic shapes: after the first batch, training steps on packs of other
    lengths and sequence counts compile nothing new (counted by dynamo; a backend that specialises on
    the row length would add a graph per batch)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qwen3train.models.build import compile_layers

    torch._dynamo.reset()
    counters.clear()
    emb = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), max_doc_length=96), train_precision="fp32")
    assert compile_layers(emb.backbone, backend="aot_eager") == 2
    emb.pack_grouped, emb.pack_share = False, 0  # what build_embedder sets for compiled layers: one block, one shape
    emb.pack_tokens = None
    ids = emb.tok.token_ids(TEXTS, 96)
    graphs = []
    for k in range(6):
        sel = ids[k: k + 3 + 2 * k]
        emb(**emb.pack(sel).inputs("cpu")).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] >= 1 and graphs[-1] == graphs[1], graphs
