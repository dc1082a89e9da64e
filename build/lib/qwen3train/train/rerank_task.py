"""The reranker task: per-query groups (1 positive + n mined negatives) -> yes/no logits -> loss.

Same interface as EmbeddingTask, so the one loop trains both. A group never straddles micro
batches (rows are split by query), so the listwise loss always sees whole groups. The training-time
score is exactly ``Reranker.score``: the same prompt, truncation and two LM-head rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen3train.data.instructions import resolve_instruction
from qwen3train.data.sources import DataConfig, IndexedSource


@dataclass
class RerankBatch:
    ids: list[list[int]]  # [b * G] token ids, group by group (positive first)
    group: int

    def __len__(self) -> int:
        return len(self.ids) // self.group

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.ids))


class RerankTask:
    def __init__(self, reranker, loss_fn, source: IndexedSource, data: DataConfig, default_instruction: str,
                 seed: int) -> None:
        if data.num_hard_negatives < 1:
            raise ValueError("the reranker needs data.num_hard_negatives >= 1 (groups of 1 positive + n negatives)")
        self.reranker, self.loss_fn, self.source, self.data = reranker, loss_fn, source, data
        self.k = data.num_hard_negatives
        self.default_instruction = default_instruction
        self.seed = seed

    @property
    def module(self):
        return self.reranker

    def prepare(self, items: list[tuple[int, int]], epoch: int) -> RerankBatch:
        queries, docs, instr = [], [], []
        for idx, j in items:
            rec = self.source[idx]
            rng = np.random.default_rng([self.seed, epoch, idx])
            pick = rng.choice(len(rec.neg), size=self.k, replace=len(rec.neg) < self.k)
            group = [rec.pos[j]] + [rec.neg[int(t)] for t in pick]
            ins = resolve_instruction(rec.task, rec.instruction, self.data.task_instructions, self.default_instruction)
            queries += [rec.query] * len(group)
            docs += group
            instr += [ins] * len(group)
        return RerankBatch(self.reranker.token_ids(queries, docs, instr), 1 + self.k)

    @staticmethod
    def split(batch: RerankBatch, n: int) -> list[RerankBatch]:
        per = len(batch) // n * batch.group
        return [RerankBatch(batch.ids[i * per:(i + 1) * per], batch.group) for i in range(n)]

    def forward(self, engine, batch: RerankBatch) -> torch.Tensor:
        enc = self.reranker.pad(batch.ids)
        dev = self.reranker.device
        z = engine.forward(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                           with_logsumexp=self.loss_fn.needs_logsumexp)
        return z.view(len(batch), batch.group, -1)  # [b, G, 2 or 3]

    @staticmethod
    def join(parts):
        return torch.cat(parts)

    def loss(self, z: torch.Tensor, batch: RerankBatch):
        return self.loss_fn(z)

    def export(self, out_dir, state_dict=None, instruction: str | None = None):
        from qwen3train.models.export import export_reranker

        if state_dict is not None:
            state_dict = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        return export_reranker(self.reranker, out_dir, state_dict=state_dict)
