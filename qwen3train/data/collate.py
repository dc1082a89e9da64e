"""Collators: records -> formatted, tokenized batches. The tokenizer is their argument; the model is not.

One collator per task kind (embedding: query / positive / K negatives; reranker: groups of one
positive and K negatives), sharing the one negative sampler and the one instruction resolver
(``data.instructions.Instructions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qwen3train.data.instructions import Instructions
from qwen3train.data.records import Record, doc_hash
from qwen3train.text import DEFAULT_QUERY_TEMPLATE, format_query
from qwen3train.errors import ConfigError

Row = tuple[int, Record, int]  # (record index, record, which positive)
# What a batch carries besides its tokens, made once and reused (``train.loop.prepare_batch``, on the data thread):
# ``packed``: a micro batch's packed rows (``task.pack``); ``micro``: ((micro-batch rows, token budget), the micro
# batches the loop cuts this batch into); ``records``: its rows (``Row``), set by the loader, named when its step is
# skipped (``train.loop.skip_step``). Never compared, never printed.
_MEMO = dict(default=None, repr=False, compare=False)


def sample_negatives(rec: Record, k: int, seed: int, epoch: int, idx: int) -> list[str]:
    """K of the record's negatives, fixed by (seed, epoch, record): the same on every rank and resume;
    drawn with replacement only when the record has fewer than K. A "negative" that is one of the record's
    positives or ``not_neg`` texts (data mined without excluding them, duplicates) is not drawn while others
    remain: the embedder's loss would mask it (a wasted slot), the reranker would learn to say no to a positive."""
    return [rec.neg[i] for i in negative_indices(rec, k, seed, epoch, idx)]


def negative_indices(rec: Record, k: int, seed: int, epoch: int, idx: int) -> list[int]:
    """Where in ``rec.neg`` the K negatives of ``sample_negatives`` are (their teacher's scores go with them)."""
    if k == 0:
        return []
    at = list(range(len(rec.neg)))
    known = set(rec.pos).union(rec.not_neg)
    if not known.isdisjoint(rec.neg):
        at = [i for i in at if rec.neg[i] not in known] or at
    rng = np.random.default_rng([seed, epoch, idx])
    pick = rng.choice(len(at), size=k, replace=len(at) < k)
    return [at[int(t)] for t in pick]


def teacher_scores(rows: Sequence[Row], picks: list[list[int]]) -> torch.Tensor:
    """``[b, 1 + K]``: each row's teacher's scores of its positive and its K negatives (distillation); a row
    whose record has none is NaN throughout (it trains without the distillation term)."""
    out = torch.full((len(rows), 1 + (len(picks[0]) if picks else 0)), float("nan"))
    for r, ((_, rec, j), at) in enumerate(zip(rows, picks)):
        if rec.has_teacher:
            out[r] = torch.tensor([rec.pos_scores[j]] + [rec.neg_scores[i] for i in at])
    return out


NO_HASH = -(1 << 63)  # the padding of ``not_neg_hash`` (no text hashes to it but with probability 2^-64)


def not_neg_hashes(rows: Sequence[Row]) -> torch.Tensor | None:
    """Per row, the hashes of its record's positives other than the one it trains on, and of its ``not_neg``
    texts; ``[b, M]`` padded with ``NO_HASH``, or None when no row has any (single-positive data)."""
    known = [{doc_hash(t) for t in (*rec.pos[:j], *rec.pos[j + 1:], *rec.not_neg)} - {doc_hash(rec.pos[j])}
             for _, rec, j in rows]
    m = max(map(len, known), default=0)
    if m == 0:
        return None
    return torch.tensor([sorted(h) + [NO_HASH] * (m - len(h)) for h in known], dtype=torch.long)


@dataclass
class EmbeddingBatch:
    """Token ids per row: one query, one positive, K negatives; text hashes for the identical rule, and per
    row the hashes of the texts that are no negatives of it: its record's other positives and ``not_neg``
    texts (``[b, M]``, padded with ``NO_HASH``; the loss masks pool documents among them)."""

    q: list[list[int]]
    pos: list[list[int]]
    neg: list[list[list[int]]]  # [b][K]
    pos_hash: torch.Tensor  # [b] int64
    neg_hash: torch.Tensor  # [b, K] int64
    not_neg_hash: torch.Tensor | None = None  # [b, M] int64; None: no row has any
    teacher: torch.Tensor | None = None  # [b, 1 + K] float32, a teacher's scores (NaN: none); None: no distillation
    packed: Any = field(**_MEMO)
    micro: Any = field(**_MEMO)
    records: Any = field(**_MEMO)

    def __len__(self) -> int:
        return len(self.q)

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.q)) + sum(map(len, self.pos)) + sum(len(n) for row in self.neg for n in row)

    def row_tokens(self) -> list[int]:
        """Tokens of each row: its query, its positive and its negatives."""
        return [len(q) + len(p) + sum(map(len, n)) for q, p, n in zip(self.q, self.pos, self.neg)]

    def sequences(self) -> list[list[int]]:
        """Every sequence, as a packed forward takes them: the queries, the positives, then the negatives row by row."""
        return self.q + self.pos + [n for row in self.neg for n in row]

    def rows(self, sl: slice) -> "EmbeddingBatch":
        return EmbeddingBatch(self.q[sl], self.pos[sl], self.neg[sl], self.pos_hash[sl], self.neg_hash[sl],
                              None if self.not_neg_hash is None else self.not_neg_hash[sl],
                              None if self.teacher is None else self.teacher[sl])


@dataclass
class RerankBatch:
    ids: list[list[int]]  # [b * G] token ids, group by group (positive first)
    group: int
    teacher: torch.Tensor | None = None  # [b, G] a teacher's scores of each group's texts (NaN: none)
    packed: Any = field(**_MEMO)
    micro: Any = field(**_MEMO)
    records: Any = field(**_MEMO)

    def __len__(self) -> int:
        return len(self.ids) // self.group

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.ids))

    def row_tokens(self) -> list[int]:
        """Tokens of each row (a query's group of prompts)."""
        return [sum(map(len, self.ids[r * self.group:(r + 1) * self.group])) for r in range(len(self))]

    def sequences(self) -> list[list[int]]:
        return self.ids

    def rows(self, sl: slice) -> "RerankBatch":
        """The groups of rows ``sl`` (a group never straddles two parts)."""
        g = self.group
        return RerankBatch(self.ids[sl.start * g:sl.stop * g], g, None if self.teacher is None else self.teacher[sl])


class EmbeddingCollator:
    """``tokenizer.token_ids(texts, max_length)`` (``qwen3train.text.EmbeddingTokenizer``) does the tokens;
    ``teacher``: batches carry the records' teacher scores (``loss.kd_weight`` > 0)."""

    def __init__(self, tokenizer, instructions: Instructions, *, k: int, seed: int, max_query_length: int,
                 max_doc_length: int, query_template: str = DEFAULT_QUERY_TEMPLATE, teacher: bool = False) -> None:
        self.tok, self.instructions, self.k, self.seed = tokenizer, instructions, k, seed
        self.max_query_length, self.max_doc_length, self.template = max_query_length, max_doc_length, query_template
        self.teacher = teacher

    def __call__(self, rows: Sequence[Row], epoch: int) -> EmbeddingBatch:
        queries, pos, negs, d_instr, picks = [], [], [], [], []
        for idx, rec, j in rows:
            queries.append(format_query(rec.query, self.instructions.of(rec), self.template))
            d_instr.append(self.instructions.document(rec.task, rec.type, rec.instruction))
            pos.append(rec.pos[j])
            picks.append(negative_indices(rec, self.k, self.seed, epoch, idx))
            negs.append([rec.neg[i] for i in picks[-1]])
        q_ids = self.tok.token_ids(queries, self.max_query_length)
        docs = [format_query(d, i, self.template) for d, i in zip(pos, d_instr)]
        docs += [format_query(n, i, self.template) for row, i in zip(negs, d_instr) for n in row]
        d_ids = self.tok.token_ids(docs, self.max_doc_length)
        b = len(rows)
        neg_ids = [d_ids[b + r * self.k: b + (r + 1) * self.k] for r in range(b)]
        pos_hash = torch.tensor([doc_hash(p) for p in pos], dtype=torch.long)
        neg_hash = torch.tensor([[doc_hash(n) for n in row] for row in negs], dtype=torch.long).view(b, self.k)
        return EmbeddingBatch(q_ids, d_ids[:b], neg_ids, pos_hash, neg_hash, not_neg_hashes(rows),
                              teacher_scores(rows, picks) if self.teacher else None)


class RerankCollator:
    """``encode(queries, docs, instructions) -> token ids`` builds the yes/no prompt (the reranker's own
    ``token_ids``: the same prompt and truncation as ``Reranker.score``)."""

    def __init__(self, encode: Callable[..., list[list[int]]], instructions: Instructions, *, k: int,
                 seed: int, teacher: bool = False) -> None:
        if k < 1:
            raise ConfigError("the reranker needs data.num_hard_negatives >= 1 (groups of 1 positive + n negatives)")
        self.encode, self.instructions, self.k, self.seed = encode, instructions, k, seed
        self.teacher = teacher

    def __call__(self, rows: Sequence[Row], epoch: int) -> RerankBatch:
        queries, docs, instr, picks = [], [], [], []
        for idx, rec, j in rows:
            picks.append(negative_indices(rec, self.k, self.seed, epoch, idx))
            group = [rec.pos[j]] + [rec.neg[i] for i in picks[-1]]
            queries += [rec.query] * len(group)
            docs += group
            instr += [self.instructions.of(rec)] * len(group)
        return RerankBatch(self.encode(queries, docs, instr), 1 + self.k,
                           teacher_scores(rows, picks) if self.teacher else None)
