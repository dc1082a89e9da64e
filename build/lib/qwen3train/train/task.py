"""The embedding task: records -> token ids -> (q, pos, neg) representations -> InfoNCE.

A task owns the model and the loss and exposes what the loop needs, so the loop is the same for
every stage (and for the reranker's task):
  ``prepare(items, epoch) -> batch``; ``split(batch, n)``; ``forward(engine, batch) -> reps``;
  ``join([reps, ...]) -> reps``; ``loss(reps, batch) -> (loss, stats)``; ``export(dir, state_dict)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen3train.data.instructions import is_symmetric, resolve_instruction
from qwen3train.data.records import text_hash
from qwen3train.data.sources import DataConfig, IndexedSource
from qwen3train.text import format_query


@dataclass
class EmbeddingBatch:
    """Token ids per row: one query, one positive, K negatives; text hashes for the identical rule."""

    q: list[list[int]]
    pos: list[list[int]]
    neg: list[list[list[int]]]  # [b][K]
    pos_hash: torch.Tensor  # [b] int64
    neg_hash: torch.Tensor  # [b, K] int64

    def __len__(self) -> int:
        return len(self.q)

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.q)) + sum(map(len, self.pos)) + sum(len(n) for row in self.neg for n in row)

    def rows(self, sl: slice) -> "EmbeddingBatch":
        return EmbeddingBatch(self.q[sl], self.pos[sl], self.neg[sl], self.pos_hash[sl], self.neg_hash[sl])


class EmbeddingTask:
    def __init__(self, embedder, loss_fn, source: IndexedSource, data: DataConfig, default_instruction: str,
                 seed: int) -> None:
        self.embedder = embedder
        self.loss_fn = loss_fn
        self.source = source
        self.data = data
        self.k = data.num_hard_negatives
        self.default_instruction = default_instruction
        self.seed = seed

    @property
    def module(self):
        return self.embedder

    def prepare(self, items: list[tuple[int, int]], epoch: int) -> EmbeddingBatch:
        """Read this rank's records; sample K negatives per record with a per-(epoch, record) seed."""
        queries, pos, negs, q_instr, d_instr = [], [], [], [], []
        for idx, j in items:
            rec = self.source[idx]
            instr = resolve_instruction(rec.task, rec.instruction, self.data.task_instructions,
                                        self.default_instruction)
            queries.append(rec.query)
            q_instr.append(instr)
            d_instr.append(instr if is_symmetric(rec.task, rec.type, self.data.symmetric_tasks) else None)
            pos.append(rec.pos[j])
            if self.k:
                rng = np.random.default_rng([self.seed, epoch, idx])
                pick = rng.choice(len(rec.neg), size=self.k, replace=len(rec.neg) < self.k)
                negs.append([rec.neg[int(t)] for t in pick])
            else:
                negs.append([])
        emb, tok = self.embedder, self.embedder.tok
        q_ids = tok.token_ids([format_query(q, i, emb.query_template) for q, i in zip(queries, q_instr)],
                              emb.max_query_length)
        docs = [format_query(d, i, emb.query_template) for d, i in zip(pos, d_instr)]
        docs += [format_query(n, i, emb.query_template) for row, i in zip(negs, d_instr) for n in row]
        d_ids = tok.token_ids(docs, emb.max_doc_length)
        b = len(items)
        neg_ids = [d_ids[b + r * self.k: b + (r + 1) * self.k] for r in range(b)]
        pos_hash = torch.tensor([text_hash(p) for p in pos], dtype=torch.long)
        neg_hash = torch.tensor([[text_hash(n) for n in row] for row in negs], dtype=torch.long).view(b, self.k)
        return EmbeddingBatch(q_ids, d_ids[:b], neg_ids, pos_hash, neg_hash)

    @staticmethod
    def split(batch: EmbeddingBatch, n: int) -> list[EmbeddingBatch]:
        size = len(batch) // n
        return [batch.rows(slice(i * size, (i + 1) * size)) for i in range(n)]

    def forward(self, engine, batch: EmbeddingBatch):
        """-> (q [b, H], pos [b, H], neg [b, K, H] or None), not normalised."""
        tok = self.embedder.tok
        q_in = tok.pad(batch.q)
        d_in = tok.pad(batch.pos + [n for row in batch.neg for n in row])
        dev = self.embedder.device
        q, d = engine.forward(input_ids=q_in["input_ids"].to(dev), attention_mask=q_in["attention_mask"].to(dev),
                              doc_input_ids=d_in["input_ids"].to(dev),
                              doc_attention_mask=d_in["attention_mask"].to(dev))
        b = len(batch)
        neg = d[b:].view(b, self.k, -1) if self.k else None
        return q, d[:b], neg

    @staticmethod
    def join(parts):
        q = torch.cat([p[0] for p in parts])
        pos = torch.cat([p[1] for p in parts])
        neg = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
        return q, pos, neg

    def loss(self, reps, batch: EmbeddingBatch):
        q, pos, neg = reps
        dev = q.device
        return self.loss_fn(q, pos, neg, batch.pos_hash.to(dev), batch.neg_hash.to(dev) if self.k else None)

    def export(self, out_dir, state_dict=None, instruction: str | None = None):
        from qwen3train.models.export import export_embedder

        if state_dict is not None:  # consolidated ZeRO-3 weights of the Embedder; keep the backbone's
            state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        return export_embedder(self.embedder, out_dir, instruction=instruction or self.default_instruction,
                               state_dict=state_dict)

