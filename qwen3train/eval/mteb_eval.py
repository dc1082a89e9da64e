"""MTEB / MMTEB evaluation of an export with Qwen3-Embedding's instruction convention (the only module
that imports ``mteb``, 2.x).

    make mteb ARGS="model=outputs/stage2/final tasks=[STS12,SciFact]"
    make mteb ARGS="model=outputs/merged benchmark='MTEB(eng, v2)'"
    make mteb ARGS="model=outputs/merged collections=[../shared/data/arcd]"   # offline, local folders

Instructions (as the released evaluation selects them; spec section 8): ``mteb.instructions`` (YAML) >
the table shipped in ``resources/mteb_task_instructions.json`` > MTEB's own task prompt > the table's
``default``. Retrieval-type tasks give documents no instruction unless the entry is a
``{query, passage}`` pair (a symmetric task such as ArguAna); STS and pair classification use
``Retrieve semantically similar text`` on both sides; other task types instruct every input. Texts
are ``Instruct: {instruction}\\nQuery:{text}``, encoded by :class:`qwen3train.eval.encoder.Encoder`
(last token, L2-normalised: the README recipe).

Local BEIR/TREC folders (``collections``) run as MTEB retrieval tasks built in memory (no hub
download); their instruction is looked up by folder name like any task. Results are written in MTEB's
result format under ``<output_dir>/results`` and as one table (``results.jsonl``/``results.md``) with
nDCG@10, Recall@100 and MRR@10 where the task reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qwen3train.errors import ConfigError

SIMILARITY = "Retrieve semantically similar text"
RETRIEVAL_TYPES = ("Retrieval", "InstructionRetrieval", "Reranking")


@dataclass
class MtebConfig:
    export: str = "outputs/stage2/final"  # the model folder (``model=`` on the command line is accepted for it)
    tasks: list[str] = field(default_factory=list)  # MTEB task names
    benchmark: str | None = None  # a named MTEB benchmark, e.g. "MTEB(eng, v2)"
    collections: list[str] = field(default_factory=list)  # local BEIR/TREC folders, run as retrieval tasks
    languages: list[str] = field(default_factory=list)  # filter tasks by language (ISO 639-3), e.g. [eng]
    instructions: dict[str, Any] = field(default_factory=dict)  # task -> instruction or {query, passage}
    output_dir: str = "outputs/mteb"
    max_length: int = 8192
    batch_size: int = 8
    precision: str = "auto"
    label: str | None = None  # the model's name in the results (default: the folder name)
    overwrite: bool = False  # rerun tasks whose results exist

    def __post_init__(self) -> None:
        from qwen3train.precision import precision_name

        precision_name(self.precision, "precision")


def instruction_table(overrides: dict | None = None) -> dict[str, Any]:
    with resources.files("qwen3train").joinpath("resources/mteb_task_instructions.json").open() as f:
        table = json.load(f)
    table.pop("_source", None)
    table.update(overrides or {})
    return table


def select_instruction(table: dict[str, Any], task_name: str, task_type: str, task_prompt, side: str | None
                       ) -> str | None:
    """The instruction for one side (``"query"``, ``"document"`` or None = not a retrieval side) of a
    task, by the released evaluation's rule; None = the text is encoded raw."""
    entry = table.get(task_name)
    symmetric = isinstance(entry, dict)
    if isinstance(entry, dict):
        entry = entry.get("passage" if side == "document" else "query") or entry.get("query")
    if task_type in ("STS", "PairClassification"):
        return SIMILARITY
    if any(t in task_type for t in RETRIEVAL_TYPES) and side == "document" and not symmetric:
        return None
    if not entry:
        if isinstance(task_prompt, dict):
            task_prompt = task_prompt.get("passage" if side == "document" else "query")
        entry = task_prompt or table.get("default")
    return entry or None


def _encoder_class():
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType

    class Qwen3TrainEncoder(AbsEncoder):
        """MTEB's encoder protocol over our Encoder: the instruction chosen per task and side."""

        def __init__(self, path: str, *, label: str, table: dict, max_length: int, batch_size: int,
                     precision: str) -> None:
            from mteb.models.model_meta import ModelMeta

            from qwen3train.eval.encoder import Encoder

            self.encoder = Encoder(path, max_length=max_length, batch_size=batch_size, precision=precision)
            self.table = table
            self.used: dict[str, dict[str, str | None]] = {}  # task -> side -> instruction (for the report)
            self.mteb_model_meta = ModelMeta(
                loader=None, name=f"qwen3train/{label}", revision="local", release_date=None, languages=None,
                n_parameters=None, memory_usage_mb=None, max_tokens=max_length, embed_dim=None, license=None,
                open_weights=True, public_training_code=None, public_training_data=None,
                framework=["PyTorch", "Sentence Transformers"], similarity_fn_name="cosine", use_instructions=True,
                training_datasets=None)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            side = {PromptType.query: "query", PromptType.document: "document"}.get(prompt_type)
            instr = select_instruction(self.table, task_metadata.name, task_metadata.type, task_metadata.prompt, side)
            self.used.setdefault(task_metadata.name, {})[side or "all"] = instr
            if instr is None:
                vec = self.encoder.encode_docs(texts)
            else:
                vec = self.encoder.encode_queries(texts, instr)
            return vec.float().numpy()

    return Qwen3TrainEncoder


def local_retrieval_task(folder: str | Path):
    """A BEIR/MS MARCO/TREC folder as an MTEB retrieval task (in memory): its test split, or ``folder@split``'s."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    from qwen3train.data.collections import load_spec, parse_spec

    from qwen3train.eval.metrics import shares_ids

    col = load_spec(folder)
    name, (folder, split) = col.name.split("@")[0], parse_spec(folder)

    class LocalRetrieval(AbsTaskRetrieval):
        ignore_identical_ids = shares_ids(col.queries, col.corpus)  # the rule of our evaluator (eval/metrics.py)
        metadata = TaskMetadata(
            name=name, description=f"Local BEIR/TREC collection {folder}", type="Retrieval", category="t2t",
            dataset={"path": str(Path(folder).resolve()), "revision": "local"}, eval_splits=[split],
            eval_langs=["eng-Latn"], main_score="ndcg_at_10", modalities=["text"], date=None, domains=[],
            task_subtypes=[], license=None, annotations_creators=None, dialect=[], sample_creation=None,
            bibtex_citation="", reference=None)

        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            data = RetrievalSplitData(
                corpus=Dataset.from_list([{"id": d, "text": t} for d, t in col.corpus.items()]),
                queries=Dataset.from_list([{"id": q, "text": t} for q, t in col.queries.items()]),
                relevant_docs={q: dict(r) for q, r in col.qrels.items()}, top_ranked=None)
            self.dataset = {"default": {split: data}}
            self.data_loaded = True

    return LocalRetrieval()


def get_tasks(cfg: MtebConfig) -> list:
    import mteb

    tasks = []
    if cfg.benchmark:
        try:
            tasks += list(mteb.get_benchmark(cfg.benchmark).tasks)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"mteb.benchmark: {e}") from None
    if cfg.tasks:
        try:
            tasks += list(mteb.get_tasks(tasks=list(cfg.tasks), languages=list(cfg.languages) or None))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"mteb.tasks: {e}") from None
    from qwen3train.data.collections import parse_spec

    for c in cfg.collections:
        if not parse_spec(c)[0].is_dir():
            raise ConfigError(f"mteb.collections: {c} is not a folder (or folder@split)")
        tasks.append(local_retrieval_task(c))
    if not tasks:
        raise ConfigError("mteb: name tasks=[...], benchmark=... or collections=[...]")
    return tasks


SCORES = {"ndcg_at_10": "ndcg@10", "recall_at_100": "recall@100", "mrr_at_10": "mrr@10", "main_score": "main_score"}


def run(cfg: MtebConfig) -> list[dict]:
    try:
        import mteb
        from mteb.cache import ResultCache
    except ModuleNotFoundError:
        raise ConfigError("make mteb needs the mteb package: pip install 'qwen3train[mteb]'") from None

    hub_name = cfg.export.count("/") == 1 and not cfg.export.startswith((".", "/", "~"))
    if not Path(cfg.export).exists() and not hub_name:
        raise ConfigError(f"mteb: model {cfg.export} does not exist")
    label = cfg.label or Path(cfg.export).name
    tasks = get_tasks(cfg)  # a wrong task name fails before the model loads
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _encoder_class()(cfg.export, label=label, table=instruction_table(cfg.instructions),
                              max_length=cfg.max_length, batch_size=cfg.batch_size, precision=cfg.precision)
    from qwen3train.progress import Progress, mode

    with Progress(len(tasks), f"mteb {label}", "tasks") as bar:  # mteb's own bars on a terminal; one line elsewhere
        result = mteb.evaluate(model, tasks, cache=ResultCache(out / "results"), show_progress_bar=mode() == "bar",
                               overwrite_strategy="always" if cfg.overwrite else "only-missing",
                               encode_kwargs={"batch_size": cfg.batch_size})
        bar.update(len(tasks))
    rows = []
    for tr in result.task_results:
        for split, subsets in tr.scores.items():
            for s in subsets:
                row = {"model": label, "task": tr.task_name, "split": split, "subset": s.get("hf_subset", "default")}
                row.update({ours: float(s[k]) for k, ours in SCORES.items() if k in s})
                row["instructions"] = model.used.get(tr.task_name, {})
                rows.append(row)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results.md").write_text(table(rows))
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    cols = [c for c in ("main_score", "ndcg@10", "recall@100", "mrr@10") if any(c in r for r in rows)]
    head = "| model | task | split | subset | " + " | ".join(cols) + " |\n|---|---|---|---|" + "---|" * len(cols) + "\n"
    return head + "".join(f"| {r['model']} | {r['task']} | {r['split']} | {r['subset']} | "
                          + " | ".join(f"{r[c]:.4f}" if c in r else "" for c in cols) + " |\n" for r in rows)

