"""Model cards: every export carries a ``README.md`` (Hugging Face model card: YAML front matter, then
what it is, how it was made, how it scores, how to use it), rebuilt from the facts kept in the export's
``qwen3train.json`` under ``"card"``:

* ``base_model`` and ``lineage``: one entry per stage that led here (stage name, steps, batch, learning
  rate, loss and its settings, data files with record counts and rejects), inherited from the export a
  stage started from (``model.init_from``) and, for merges, the merged checkpoints and method;
* ``evaluation``: rows added by ``make eval`` / the pipeline's report (``add_evaluation``);
* ``license``.

``push_to_hub(folder, repo_id)`` uploads a folder with its card (``export.push_to_hub=<repo>``).
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_META = "qwen3train.json"  # the same file name as models/export.py writes (tests/test_structure.py)


def read_meta(folder: str | Path) -> dict:
    p = Path(folder) / EXPORT_META
    return json.loads(p.read_text()) if p.exists() else {}


def kind_name(kind: str) -> str:
    """"an embedder", "a reranker": what an export's ``kind`` says, for a message."""
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def inherited(folder: str | Path | None) -> tuple[str | None, list[dict]]:
    """(base model, lineage) of the export a stage starts from; a plain model folder or hub name is a base."""
    if not folder:
        return None, []
    card = read_meta(folder).get("card")
    if card:
        return card.get("base_model"), list(card.get("lineage", []))
    return str(folder), []


def stage_entry(cfg, data_summary) -> dict:
    """One lineage entry from a training config and the run's data summary."""
    from dataclasses import asdict

    summaries = data_summary if isinstance(data_summary, list) else [data_summary]
    loss = asdict(cfg.loss)
    return {"stage": cfg.run.name, "steps": cfg.run.max_steps or None, "epochs": cfg.run.epochs,
            "global_batch_size": cfg.engine.global_batch_size, "lr": cfg.optim.lr, "schedule": cfg.optim.schedule,
            "precision": cfg.engine.precision, "lora": bool(cfg.model.lora.enabled),
            "loss": loss, "hard_negatives": cfg.data.num_hard_negatives,
            "data": [{"files": [Path(f).name for f in s.get("files", [])] or [s.get("source", "?")],
                      "records": s.get("records"), "rejected": s.get("rejected", 0),
                      "tasks": s.get("tasks", [])} for s in summaries]}


def set_card(folder: str | Path, *, base_model: str | None, lineage: list[dict], license: str = "apache-2.0",
             evaluation: list[dict] | None = None) -> Path:
    """Store the card facts in the export's metadata and (re)write its README.md."""
    folder = Path(folder)
    meta = read_meta(folder)
    old = meta.get("card", {})
    meta["card"] = {"base_model": base_model, "lineage": lineage, "license": license,
                    "evaluation": evaluation if evaluation is not None else old.get("evaluation", [])}
    (folder / EXPORT_META).write_text(json.dumps(meta, indent=2))
    (folder / "README.md").write_text(render(folder, meta))
    return folder / "README.md"


def add_evaluation(folder: str | Path, rows: list[dict]) -> None:
    """Add (or replace, by dataset and dim) evaluation rows of this model and rewrite the card."""
    meta = read_meta(folder)
    if "card" not in meta:
        return
    keep = {(r["dataset"], r.get("dim")) for r in rows}
    old = [r for r in meta["card"].get("evaluation", []) if (r["dataset"], r.get("dim")) not in keep]
    metrics = ("ndcg@10", "recall@100", "mrr@10", "spearman", "ndcg@10_before", "queries", "pairs")
    new = [{"dataset": r["dataset"], "dim": r.get("dim"), **{m: r[m] for m in metrics if m in r}} for r in rows]
    card = meta["card"]
    set_card(folder, base_model=card.get("base_model"), lineage=card.get("lineage", []),
             license=card.get("license", "apache-2.0"), evaluation=old + new)


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def render(folder: Path, meta: dict) -> str:
    card = meta.get("card", {})
    kind = meta.get("kind", "embedder")
    lineage = card.get("lineage", [])
    name = folder.name
    if name in ("model", "final") and lineage:  # a checkpoint's export or a run's final: say which stage
        last = lineage[-1]
        name = f"{last.get('stage')}" + (f" (step {last['steps']})" if last.get("stage") != "merge" else "")
    tags = ["qwen3train", "sentence-transformers"] + (["feature-extraction", "sentence-similarity"] if kind == "embedder"
                                                      else ["text-ranking", "reranker"])
    front = ["---", f"license: {card.get('license', 'apache-2.0')}", "library_name: sentence-transformers",
             f"pipeline_tag: {'sentence-similarity' if kind == 'embedder' else 'text-ranking'}",
             "tags:"] + [f"- {t}" for t in tags]
    if card.get("base_model") and not Path(str(card["base_model"])).is_absolute():
        front.append(f"base_model: {_yaml_str(card['base_model'])}")
    front.append("---")
    out = front + ["", f"# {name}", "",
                   f"A {'text embedding model' if kind == 'embedder' else 'reranker (yes/no relevance classifier)'} "
                   f"trained with qwen3train, an open reproduction of the Qwen3-Embedding training recipe "
                   f"(weakly supervised contrastive pre-training on synthetic pairs, supervised fine-tuning with mined "
                   f"hard negatives, spherical merging of checkpoints).", "",
                   f"- Base model: `{card.get('base_model') or 'unknown'}`"]
    if kind == "embedder":
        out += [f"- Pooling: last token (the appended `{meta.get('end_token')}`), L2-normalised; "
                f"max length {meta.get('max_query_length')} (queries) / {meta.get('max_doc_length')} (documents)",
                f"- Query format: `{meta.get('query_template', '')}`".replace("\n", "\\n"),
                f"- Default instruction: {meta.get('default_instruction')!r}"]
        if meta.get("task_instructions"):
            out.append("- Named prompts (one per training task): " + ", ".join(f"`{t}`" for t in meta["task_instructions"]))
    else:
        out += [f"- Score: P(yes) = sigmoid(z_yes - z_no) at the last position; max length {meta.get('max_length')}",
                f"- Default instruction: {meta.get('default_instruction')!r}"]
    out += ["", "## Training", ""]
    if not lineage:
        out.append("No training recorded (an export of the base model).")
    for i, st in enumerate(lineage, 1):
        if st.get("stage") == "merge":
            out.append(f"{i}. **merge** ({st.get('method')}): " + ", ".join(f"`{s}`" for s in st.get("sources", []))
                       + (f"; {st['note']}" if st.get("note") else ""))
            continue
        loss = st.get("loss", {})
        loss_s = ", ".join(f"{k}={v}" for k, v in loss.items() if not isinstance(v, (dict, list)))
        data = "; ".join(f"{', '.join(d['files'])}: {d['records']:,} records" + (f" ({d['rejected']} rejected)" if d.get("rejected") else "")
                         for d in st.get("data", []) if d.get("records") is not None)
        out.append(f"{i}. **{st.get('stage')}**: {st.get('steps') or str(st.get('epochs')) + ' epoch(s)'} steps at "
                   f"global batch {st.get('global_batch_size')}, lr {st.get('lr')} ({st.get('schedule')}), "
                   f"{'LoRA' if st.get('lora') else 'full fine-tuning'}, precision {st.get('precision')}, "
                   f"{st.get('hard_negatives', 0)} hard negatives per query. Loss: {loss_s}. Data: {data or '-'}.")
    ev = card.get("evaluation", [])
    out += ["", "## Evaluation", ""]
    if ev:
        cols = [m for m in ("ndcg@10", "recall@100", "mrr@10", "spearman") if any(m in r for r in ev)]
        out += ["| dataset | dim | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        out += [f"| {r['dataset']} | {r.get('dim') or 'full'} | " + " | ".join(f"{r[c]:.4f}" if c in r else ""
                                                                         for c in cols) + " |" for r in ev]
    else:
        out.append("Not evaluated yet (`make eval` or `make mteb` adds results here).")
    out += ["", "## Usage", ""] + (_usage_embedder(meta) if kind == "embedder" else _usage_reranker(meta))
    out += ["", "## Licence", "", f"{card.get('license', 'apache-2.0')}; the base model's licence also applies.", ""]
    return "\n".join(out)


def _usage_embedder(meta: dict) -> list[str]:
    instr = meta.get("default_instruction", "")
    tmpl = meta.get("query_template", "Instruct: {instruction}\nQuery:{query}")
    return ["sentence-transformers (the `query` prompt holds the default instruction; documents get none):", "",
            "```python", "from sentence_transformers import SentenceTransformer", 'model = SentenceTransformer("<this folder or repo>")',
            'q = model.encode(["what is the capital of China?"], prompt_name="query")',
            'd = model.encode(["The capital of China is Beijing."])', "print(model.similarity(q, d))", "```", "",
            "transformers (left padding, the last token, L2 normalisation):", "", "```python",
            "import torch.nn.functional as F", "from transformers import AutoModel, AutoTokenizer",
            'tok = AutoTokenizer.from_pretrained("<this folder or repo>", padding_side="left")',
            'model = AutoModel.from_pretrained("<this folder or repo>").eval()',
            f"texts = [{tmpl.format(instruction=instr, query='what is the capital of China?')!r}, "
            "'The capital of China is Beijing.']",
            "batch = tok(texts, padding=True, truncation=True, return_tensors='pt')",
            "emb = F.normalize(model(**batch).last_hidden_state[:, -1], dim=-1)", "```", "",
            "vLLM:", "", "```python", "from vllm import LLM",
            'llm = LLM(model="<this folder or repo>", runner="pooling")',
            "vectors = [o.outputs.embedding for o in llm.embed(texts)]", "```"]


def _usage_reranker(meta: dict) -> list[str]:
    import json

    tokens = json.dumps([meta.get("no_token", "no"), meta.get("yes_token", "yes")])
    return ["sentence-transformers (6.x) `CrossEncoder` (scores = P(yes)):", "", "```python",
            "from sentence_transformers import CrossEncoder", 'model = CrossEncoder("<this folder or repo>")',
            'print(model.predict([("what is the capital of China?", "The capital of China is Beijing.")]))', "```", "",
            "transformers: apply the tokenizer's chat template to the (instruction, query, document) message, read the "
            "logits of the `yes` and `no` tokens at the last position, score = softmax over the two [yes].",
            "", "vLLM (the LM served as a one-label classifier, its `yes` row minus its `no` row; the chat template "
            "puts each pair in the reranker prompt; score = P(yes)):", "", "```python", "from vllm import LLM",
            'llm = LLM(model="<this folder or repo>", runner="pooling", convert="classify",',
            f'          hf_overrides={{"classifier_from_token": {tokens}, "method": "from_2_way_softmax"}})',
            'outputs = llm.score("what is the capital of China?", ["The capital of China is Beijing."],',
            "                    chat_template=llm.get_tokenizer().chat_template)",
            "print([o.outputs.score for o in outputs])", "```"]


def check_hub_token(repo_id: str) -> None:
    """Before training: a run that uploads its final model needs a token, found now (offline: the
    environment and the login file), not after days of training."""
    from huggingface_hub import get_token

    if get_token() is None:
        from qwen3train.errors import ConfigError

        raise ConfigError(f"export.push_to_hub={repo_id} needs a Hugging Face token (set HF_TOKEN or run "
                          f"`huggingface-cli login`); none was found, so nothing was trained")


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None, api=None) -> str:
    """Upload an export (with its README.md card) to the Hugging Face hub; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").exists():
        from qwen3train.errors import ConfigError

        raise ConfigError(f"{folder} has no README.md model card; export it with qwen3train first")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="Upload model exported by qwen3train")
    return str(getattr(info, "commit_url", info))


def upload_final(final_dir: Path, repo: str, private: bool) -> str:
    """A run's final export to the hub; the line that says where it went. A failed upload (network, permissions) is
    one line naming the trained model and how to retry: the same command again (the run is finished: it exports and
    uploads without training)."""
    from qwen3train.errors import ConfigError

    try:
        return f"uploaded to the hub: {push_to_hub(final_dir, repo, private=private)}"
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the hub client raises, the trained model is safe
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"the final model is at {final_dir}, but uploading it to {repo} failed "
                          f"({type(e).__name__}: {reason}); rerun the same command to upload it (training is done) "
                          f"or `huggingface-cli upload {repo} {final_dir}`") from None
