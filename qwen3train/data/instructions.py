"""Instructions: the one place that decides which instruction a text gets.

Resolution order for a record (training, mining, filtering, evaluation and export all use
``Instructions``): its own ``instruction`` (FlagEmbedding's ``prompt`` field is read as the same
thing) > ``data.task_instructions[task]`` > the task registry below (Qwen3-style, spec §8; strings
kept verbatim, typos included) > ``model.default_instruction``. A record without a task therefore
trains with exactly the instruction that the export serves as its ``query`` prompt. Symmetric tasks
give documents the instruction too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen3train.text import DEFAULT_INSTRUCTION

REGISTRY: dict[str, str] = {
    "msmarco": "Given a web search query, retrieve relevant passages that answer the query",
    "trec-dl-2019-subset": "Given a web search query, retrieve relevant passages that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "dbpedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "arcd": "Given a question, retrieve Wikipedia passages that answer the question",
    "vaswani": "Given a physics query, retrieve relevant scientific abstracts",
    "t2retrieval": "Given a Chinese search query, retrieve web passages that answer the question",
    "duretrieval": "Given a Chinese search query, retrieve web passages that answer the question",
    "codesearchnet": "Given a code snippet, retrieve the comment corresponding to that code.",
    "sts": "Retrieve semantically similar text",
    "bitext": "Retrieve parallel sentences",
    "retrieval": "Given a query, retrieve the most relevant passage from the given passage",
}
NO_TASK = "default"  # the task of a record that names none: resolves to the default instruction

SYMMETRIC = {"sts", "bitext", "quora", "classification"}


def resolve_instruction(task: str, record_instruction: str | None, overrides: dict[str, str],
                        fallback: str = DEFAULT_INSTRUCTION) -> str:
    if record_instruction:
        return record_instruction
    if task in overrides:
        return overrides[task]
    if task == NO_TASK:
        return fallback
    return REGISTRY.get(task.lower(), fallback)


@dataclass
class Instructions:
    """``data.task_instructions`` + registry + ``model.default_instruction``, applied one way everywhere."""

    overrides: dict[str, str] = field(default_factory=dict)
    default: str = DEFAULT_INSTRUCTION
    symmetric_tasks: list[str] = field(default_factory=list)

    def query(self, task: str, record_instruction: str | None = None) -> str:
        return resolve_instruction(task, record_instruction, self.overrides, self.default)

    def document(self, task: str, record_type: str | None, record_instruction: str | None = None) -> str | None:
        """The instruction a document gets: the query's for symmetric tasks, none otherwise."""
        if is_symmetric(task, record_type, self.symmetric_tasks):
            return self.query(task, record_instruction)
        return None

    def of(self, rec) -> str:
        return self.query(rec.task, rec.instruction)

    def named(self, tasks) -> dict[str, str]:
        """task -> instruction for the tasks seen in training (the export's named prompts)."""
        return {t: self.query(t) for t in tasks if t != NO_TASK}


def is_symmetric(task: str, record_type: str | None, symmetric_tasks: list[str]) -> bool:
    if record_type and record_type.startswith("symmetric"):
        return True
    return task in symmetric_tasks or task.lower() in SYMMETRIC
