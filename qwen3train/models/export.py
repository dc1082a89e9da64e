"""Exports: a standard Hugging Face folder plus sentence-transformers files.

An exported embedder loads with ``AutoModel`` (official usage recipe), with
``sentence_transformers.SentenceTransformer`` (last-token pooling, Normalize, a ``query`` prompt),
and back into qwen3train. Its tokenizer appends ``<|endoftext|>`` by itself through a
``TemplateProcessing`` post-processor, as the released Qwen3-Embedding tokenizer does, so
third-party code that relies on the tokenizer gets the same input as our training.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

from torch import nn

from qwen3train.text import query_prompt

EXPORT_META = "qwen3train.json"


def retie(module: nn.Module, full: dict) -> dict:
    """A state dict with ``module``'s tied weights made one tensor again: gathering (ZeRO-3, FSDP) or folding LoRA
    in copies an LM head that is the embedding (Qwen3-0.6B/4B) into a tensor of its own, which an export would
    then write twice (a second 0.3 GB for Qwen3-0.6B in bf16)."""
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if name in full:
            full[name] = full[first.setdefault(id(p), name)]
    return full


def plain_state_dict(model: nn.Module, state_dict: dict | None = None) -> tuple[nn.Module, dict | None]:
    """(module to save, weights under the plain architecture's names), LoRA folded in.

    For a PEFT model each adapted weight becomes ``W + (alpha / r) * B @ A`` and the adapter
    tensors are dropped, so the export loads with ``AutoModel`` like any checkpoint. Works on the
    module's own weights or on a consolidated ``state_dict`` (ZeRO-3). Non-PEFT models pass through.
    """
    peft = sys.modules.get("peft")  # a model made with peft imported it: importing it here (0.4 s) tells nothing
    if peft is None or not isinstance(model, peft.PeftModel):
        return model, state_dict
    lcfg = model.peft_config["default"]
    scale = lcfg.lora_alpha / lcfg.r
    sd = model.state_dict() if state_dict is None else state_dict
    out = {}
    for key, val in sd.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in key:
            stem = key[: key.index(".base_layer.")]
            if key.endswith(".weight"):
                a, b = sd[f"{stem}.lora_A.default.weight"], sd[f"{stem}.lora_B.default.weight"]
                val = (val.float() + scale * (b.float() @ a.float())).to(val.dtype)
            name = name.replace(".base_layer.", ".")
        out[name] = val.detach().clone()
    return model.get_base_model(), retie(model.get_base_model(), out)


def _save_weights(model: nn.Module, out: Path, state_dict: dict | None = None, dtype=None) -> None:
    """Save under the plain architecture. ``dtype``: the export dtype (``model.dtype``); training
    keeps float32 masters, exports are cast here so a bf16 model is written back in bf16."""
    plain, weights = plain_state_dict(model, state_dict)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v
                   for k, v in (weights if weights is not None else plain.state_dict()).items()}
    plain.save_pretrained(out, safe_serialization=True, state_dict=weights)
    if dtype is not None:  # save_pretrained names the in-memory dtype (float32 masters), not the file's
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# tokenizer -> {what was changed: its changed copy}: every checkpoint of a run exports the same tokenizer, and a deep
# copy of a 151k-token one costs ~1.2 s of CPU (the Qwen3 tokenizer, 2 cores, 2026-12-07): made once per process
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# a Python container of the tokenizer this long (transformers keeps the vocabulary and the merges it was built from,
# 151k entries each for Qwen) is shared by the copy, not copied: no change here touches them, and copying them
# was 0.3-0.4 s of the 0.8-0.9 s a copy took (Qwen3 tokenizer, 2 cores, 2026-12-07)
SHARED_LEN = 10_000


def _changed_copy(tokenizer, key: tuple, change):
    """A deep copy of ``tokenizer`` that ``change(copy)`` altered, made once per tokenizer and ``key``; the
    backend (Rust) tokenizer is copied, the long read-only Python containers are shared (``SHARED_LEN``)."""
    import copy

    made = _COPIES.setdefault(tokenizer, {})
    if key not in made:
        shared = {id(v): v for v in vars(tokenizer).values() if isinstance(v, (dict, list)) and len(v) >= SHARED_LEN}
        tok = copy.deepcopy(tokenizer, shared)
        change(tok)
        made[key] = tok
    return made[key]


def tokenizer_with_end_token(tokenizer, end_token: str):
    """A copy of ``tokenizer`` whose post-processor appends ``end_token`` (single and pair); ``tokenizer`` itself
    is left as it is. Made once per tokenizer and end token; callers may set ``padding_side`` on it."""
    from tokenizers import processors

    def append(tok) -> None:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {end_token}:0",
            pair=f"$A:0 {end_token}:0 $B:1 {end_token}:1",
            special_tokens=[(end_token, tok.convert_tokens_to_ids(end_token))],
        )

    return _changed_copy(tokenizer, ("end_token", end_token), append)


def export_tokenizer(model):
    """The tokenizer an export of ``model`` (an Embedder or a Reranker) writes: a copy made once per process, with
    the embedder's end token appended, or the reranker's chat template. A save in the background makes it on the
    training thread before its writer starts (making it reads the tokenizer that the data thread may be using)."""
    if hasattr(model, "yes_id"):  # a Reranker
        template = reranker_chat_template(model.tokenizer.chat_template, model.prefix, model.suffix,
                                          model.default_instruction)
        return _changed_copy(model.tokenizer, ("chat_template", template),
                             lambda t: setattr(t, "chat_template", template))
    return tokenizer_with_end_token(model.tokenizer, model.tok.end_token)


def write_sentence_transformers_files(out: Path, *, dim: int, max_seq_length: int, instruction: str,
                                      query_template: str, prompts: dict[str, str] | None = None) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling (last token), 2_Normalize, prompts: ``query``
    (the default instruction) and ``document`` (none), then one named prompt per task in ``prompts``
    (task -> instruction; for symmetric tasks use it on both sides: ``encode(texts, prompt_name=task)``)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
    st_cfg = {
        "prompts": {"query": query_prompt(instruction, query_template), "document": "",
                    **{t: query_prompt(i, query_template) for t, i in sorted((prompts or {}).items())
                       if t not in ("query", "document")}},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (out / "config_sentence_transformers.json").write_text(json.dumps(st_cfg, indent=2))


def export_embedder(embedder, out_dir: str | os.PathLike, *, instruction: str,
                    prompts: dict[str, str] | None = None, state_dict: dict | None = None) -> Path:
    """Write a loadable embedder folder (weights, tokenizer, sentence-transformers files, metadata).

    ``state_dict`` lets a caller pass gathered weights (ZeRO-3) instead of the module's own.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(embedder.backbone, out, state_dict, getattr(embedder, "export_dtype", None))
    tok = export_tokenizer(embedder)
    tok.padding_side = "left"  # what the official usage recipe sets; pooling works either way
    tok.save_pretrained(out)
    max_len = max(embedder.max_query_length, embedder.max_doc_length)
    write_sentence_transformers_files(out, dim=embedder.hidden_size, max_seq_length=max_len,
                                      instruction=instruction, query_template=embedder.query_template,
                                      prompts=prompts)
    meta = {"kind": "embedder", "query_template": embedder.query_template,
            "default_instruction": instruction, "task_instructions": dict(sorted((prompts or {}).items())), "end_token": embedder.tok.end_token,
            "max_query_length": embedder.max_query_length, "max_doc_length": embedder.max_doc_length}
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2))
    return out


def _literal(text: str) -> str:
    """``text`` as a Jinja expression (a string literal: no block tag, so trim_blocks cannot eat a newline)."""
    return "{{ " + json.dumps(text) + " }}"


def reranker_chat_template(original: str | None, prefix: str, suffix: str, default_instruction: str) -> str:
    """The reranker prompt (``prefix`` + ``<Instruct>/<Query>/<Document>`` body + ``suffix``, as
    ``Reranker.token_ids`` builds it) when the messages carry ``query``/``document`` roles (how
    sentence-transformers' CrossEncoder passes a pair), the model's own template otherwise."""
    def role(name: str) -> str:
        return f'(messages | selectattr("role", "eq", "{name}") | map(attribute="content") | first)'

    pair = ("{%- set query = " + role("query") + " -%}"
            "{%- set document = " + role("document") + " -%}"
            "{%- set instruction = " + role("instruction") + " or " + json.dumps(default_instruction) + " -%}"
            + _literal(prefix + "<Instruct>: ") + "{{ instruction }}" + _literal("\n<Query>: ") + "{{ query }}"
            + _literal("\n<Document>: ") + "{{ document }}" + _literal(suffix))
    if not original:
        return pair
    return ('{%- if messages | selectattr("role", "eq", "query") | list -%}' + pair +
            "{%- else -%}" + original + "{%- endif -%}")


def write_cross_encoder_files(out: Path, yes_id: int, no_id: int) -> None:
    """sentence-transformers (6.x) CrossEncoder modules: causal LM -> LogitScore(yes, no) -> sigmoid."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    fwd = {"method": "forward", "method_output_name": "logits"}
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"transformer_task": "text-generation",
         "modality_config": {"text": fwd, "message": dict(fwd, format="flat")},
         "module_output_name": "causal_logits"}, indent=2))
    (out / "1_LogitScore").mkdir(exist_ok=True)
    (out / "1_LogitScore" / "config.json").write_text(json.dumps(
        {"true_token_id": yes_id, "false_token_id": no_id, "module_input_name": "causal_logits"}, indent=2))
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.activation.Sigmoid",
         "prompts": {}, "default_prompt_name": None}, indent=2))


def export_reranker(reranker, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write a folder that ``AutoModelForCausalLM`` and the official usage code load as is, and that
    sentence-transformers (6.x) loads as a ``CrossEncoder`` scoring exactly like ``Reranker.score``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(reranker.lm, out, state_dict, getattr(reranker, "export_dtype", None))
    export_tokenizer(reranker).save_pretrained(out)
    write_cross_encoder_files(out, reranker.yes_id, reranker.no_id)
    no, yes = reranker.tokenizer.convert_ids_to_tokens([reranker.no_id, reranker.yes_id])
    meta = {"kind": "reranker", "max_length": reranker.max_length,
            "default_instruction": reranker.default_instruction, "yes_token": yes, "no_token": no}
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2))
    return out
