"""Tasks: the model, its forward pass, its loss and its export; the loop is the same for every stage.

A task is what the loop needs besides the batches (``data.loader.Loader`` owns the data path and
``data.collate`` the formatting and tokens):
  ``split(batch, n)``; ``forward(engine, batch) -> reps``; ``join([reps, ...]) -> reps``;
  ``loss(reps, batch) -> (loss, stats)``; ``export(dir, state_dict)``; ``module``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from qwen3train.data.collate import EmbeddingBatch


class Task(Protocol):
    @property
    def module(self) -> torch.nn.Module: ...

    def split(self, batch: Any, n: int) -> list[Any]: ...

    def forward(self, engine: Any, batch: Any) -> Any: ...

    def join(self, parts: list[Any]) -> Any: ...

    def loss(self, reps: Any, batch: Any) -> tuple[torch.Tensor, dict]: ...

    def export(self, out_dir: Any, state_dict: dict | None = None) -> Any: ...


class EmbeddingTask:
    """Embedder + InfoNCE. ``instruction``: the export's ``query`` prompt (``model.default_instruction``,
    which task-less records also train with); ``prompts``: task -> instruction of the tasks trained on,
    exported as named prompts."""

    def __init__(self, embedder, loss_fn, instruction: str, prompts: dict[str, str] | None = None) -> None:
        self.embedder = embedder
        self.loss_fn = loss_fn
        self.instruction = instruction
        self.prompts = dict(prompts or {})

    @property
    def module(self):
        return self.embedder

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
        b, k = len(batch), len(batch.neg[0]) if len(batch) else 0
        neg = d[b:].view(b, k, -1) if k else None
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
        return self.loss_fn(q, pos, neg, batch.pos_hash.to(dev), batch.neg_hash.to(dev) if neg is not None else None)

    def export(self, out_dir, state_dict=None):
        from qwen3train.models.export import export_embedder

        if state_dict is not None:  # consolidated ZeRO-3 weights of the Embedder; keep the backbone's
            state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        return export_embedder(self.embedder, out_dir, instruction=self.instruction, prompts=self.prompts,
                               state_dict=state_dict)

