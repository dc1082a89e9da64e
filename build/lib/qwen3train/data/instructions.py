"""Task -> instruction registry (Qwen3-style, spec §8; strings kept verbatim, typos included).

Resolution order for a record: its own ``instruction`` > ``data.task_instructions[task]`` >
this registry > ``model.default_instruction``. Symmetric tasks give documents the instruction too.
"""

from __future__ import annotations

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
    "default": "Given a query, retrieve the most relevant passage from the given passage",
}

SYMMETRIC = {"sts", "bitext", "quora", "classification"}


def resolve_instruction(task: str, record_instruction: str | None, overrides: dict[str, str],
                        fallback: str) -> str:
    if record_instruction:
        return record_instruction
    if task in overrides:
        return overrides[task]
    return REGISTRY.get(task.lower(), fallback)


def is_symmetric(task: str, record_type: str | None, symmetric_tasks: list[str]) -> bool:
    if record_type and record_type.startswith("symmetric"):
        return True
    return task in symmetric_tasks or task.lower() in SYMMETRIC
