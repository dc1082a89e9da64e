"""The reranker task: per-query groups (1 positive + n mined negatives) -> yes/no logits -> loss.

Same interface as EmbeddingTask, so the one loop trains both. A group never straddles micro
batches (rows are split by query), so the listwise loss always sees whole groups. The training-time
score is exactly ``Reranker.score``: the same prompt, truncation and two LM-head rows.
"""

from __future__ import annotations

import torch

from qwen3train.data.collate import RerankBatch
from qwen3train.train.task import memo_pack


class RerankTask:
    # the loss is a mean over independent query groups, never across them: accumulated micro batches give the
    # whole batch's gradients, so GradCache (train.gradcache) is never run for it (engine.grad_cache: a note)
    whole_batch_loss = False

    def __init__(self, reranker, loss_fn) -> None:
        self.reranker, self.loss_fn = reranker, loss_fn

    @property
    def module(self):
        return self.reranker

    @staticmethod
    def split(batch: RerankBatch, n: int) -> list[RerankBatch]:
        per = len(batch) // n
        return [batch.rows(slice(i * per, (i + 1) * per)) for i in range(n)]

    @staticmethod
    def unit_tokens(batch: RerankBatch) -> list[int]:
        g = batch.group
        return [sum(map(len, batch.ids[i * g:(i + 1) * g])) for i in range(len(batch))]

    @staticmethod
    def take(batch: RerankBatch, units: slice) -> RerankBatch:
        return batch.rows(units)

    def pack(self, batch: RerankBatch):
        return memo_pack(self.reranker, batch, lambda: batch.ids)

    def forward(self, engine, batch: RerankBatch) -> torch.Tensor:
        packed = self.pack(batch)
        kw = packed.inputs(self.reranker.device) if packed is not None else self.reranker.inputs(batch.ids)
        z = engine.forward(**kw, with_logsumexp=self.loss_fn.needs_logsumexp)
        return z.view(len(batch), batch.group, -1)  # [b, G, 2 or 3]

    @staticmethod
    def join(parts):
        return torch.cat(parts)

    def loss(self, z: torch.Tensor, batch: RerankBatch):
        return self.loss_fn(z, None if batch.teacher is None else batch.teacher.to(z.device))

    def export(self, out_dir, state_dict=None):
        from qwen3train.models.export import export_reranker

        if state_dict is not None:
            state_dict = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        return export_reranker(self.reranker, out_dir, state_dict=state_dict)

    def export_ready(self) -> None:
        from qwen3train.models.export import export_tokenizer

        export_tokenizer(self.reranker)
