"""Tasks: the model, its forward pass, its loss and its export; the loop is the same for every stage.

A task is what the loop needs besides the batches (``data.loader.Loader`` owns the data path and
``data.collate`` the formatting and tokens):
  ``split(batch, n)``; ``unit_tokens(batch)`` and ``take(batch, slice)`` (token-budget micro batches,
  ``token_chunks``); ``pack(batch)`` (a micro batch's packed rows, made once: on the data thread ahead of
  the step, reused by GradCache's second pass; None for a padded model); ``forward(engine, batch) -> reps``;
  ``join([reps, ...]) -> reps``;
  ``loss(reps, batch) -> (loss, stats)``; ``export(dir, state_dict)``; ``module``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from qwen3train.data.collate import EmbeddingBatch


class Task(Protocol):
    whole_batch_loss: bool  # the loss couples the batch's rows (in-batch negatives): GradCache keeps it whole

    @property
    def module(self) -> torch.nn.Module: ...

    def split(self, batch: Any, n: int) -> list[Any]: ...

    def unit_tokens(self, batch: Any) -> list[int]: ...

    def take(self, batch: Any, units: slice) -> Any: ...

    def pack(self, batch: Any) -> Any: ...

    def forward(self, engine: Any, batch: Any) -> Any: ...

    def join(self, parts: list[Any]) -> Any: ...

    def loss(self, reps: Any, batch: Any) -> tuple[torch.Tensor, dict]: ...

    def export(self, out_dir: Any, state_dict: dict | None = None) -> Any: ...

    def export_ready(self) -> None: ...  # what an export reads of objects training uses, made now (checkpoint.begin)


def memo_pack(model, batch, seqs):
    """``model.pack(seqs())`` kept on ``batch`` (``batch.packed``), built on first use; None when the model
    pads instead of packing."""
    if not model.packing:
        return None
    if batch.packed is None:
        batch.packed = model.pack(seqs())
    return batch.packed


def token_chunks(tokens: list[int], budget: int, n: int | None = None) -> list[slice]:
    """Consecutive units (an embedding row: its query, positive and negatives; a reranker group) cut
    into chunks of at most ``budget`` tokens, a unit longer than the budget alone in its chunk.

    With ``n`` (>= the greedy count, <= the number of units) the result has exactly ``n`` chunks: the
    chunk with the most tokens (of more than one unit) is halved by tokens until there are ``n``, so
    every rank can run the same number of micro steps (ZeRO reduces gradients at each) without any
    chunk growing past the budget.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    cuts, used = [0], 0
    for i, t in enumerate(tokens):
        if i > cuts[-1] and used + t > budget:
            cuts.append(i)
            used = 0
        used += t
    cuts.append(len(tokens))
    chunks = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    if n is None:
        return chunks
    if not len(chunks) <= n <= len(tokens):
        raise ValueError(f"cannot cut {len(tokens)} units into {n} chunks (the budget alone makes {len(chunks)})")
    while len(chunks) < n:
        size = [sum(tokens[c]) if c.stop - c.start > 1 else -1 for c in chunks]
        k = max(range(len(chunks)), key=size.__getitem__)
        c, half, acc = chunks[k], sum(tokens[chunks[k]]) / 2, 0
        mid = c.start + 1
        for i in range(c.start, c.stop - 1):  # the cut nearest half of the chunk's tokens
            acc += tokens[i]
            mid = i + 1
            if acc >= half:
                break
        chunks[k:k + 1] = [slice(c.start, mid), slice(mid, c.stop)]
    return chunks


class EmbeddingTask:
    """Embedder + InfoNCE. ``instruction``: the export's ``query`` prompt (``model.default_instruction``,
    which task-less records also train with); ``prompts``: task -> instruction of the tasks trained on,
    exported as named prompts."""

    whole_batch_loss = True  # in-batch negatives: every row is scored against the whole batch's documents

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

    @staticmethod
    def unit_tokens(batch: EmbeddingBatch) -> list[int]:
        return [len(q) + len(p) + sum(map(len, negs)) for q, p, negs in zip(batch.q, batch.pos, batch.neg)]

    @staticmethod
    def take(batch: EmbeddingBatch, units: slice) -> EmbeddingBatch:
        return batch.rows(units)

    def pack(self, batch: EmbeddingBatch):
        return memo_pack(self.embedder, batch, batch.sequences)

    def forward(self, engine, batch: EmbeddingBatch):
        """-> (q [b, H], pos [b, H], neg [b, K, H] or None), not normalised. Packed: queries, positives
        and negatives in one row and one forward; padded: each tower pads to its own length."""
        dev = self.embedder.device
        b, k = len(batch), len(batch.neg[0]) if len(batch) else 0
        packed = self.pack(batch)
        if packed is not None:
            reps = engine.forward(**packed.inputs(dev))  # [b + b(1 + K), H]
            q, d = reps[:b], reps[b:]
        else:
            docs = batch.pos + [n for row in batch.neg for n in row]
            q_in, d_in = self.embedder.tok.pad(batch.q), self.embedder.tok.pad(docs)
            q, d = engine.forward(input_ids=q_in["input_ids"].to(dev), attention_mask=q_in["attention_mask"].to(dev),
                                  doc_input_ids=d_in["input_ids"].to(dev),
                                  doc_attention_mask=d_in["attention_mask"].to(dev))
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
        return self.loss_fn(q, pos, neg, batch.pos_hash.to(dev), batch.neg_hash.to(dev) if neg is not None else None,
                            not_neg_ids=None if batch.not_neg_hash is None else batch.not_neg_hash.to(dev),
                            teacher=None if batch.teacher is None else batch.teacher.to(dev))

    def export(self, out_dir, state_dict=None):
        from qwen3train.models.export import export_embedder

        if state_dict is not None:  # consolidated ZeRO-3 weights of the Embedder; keep the backbone's
            state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        return export_embedder(self.embedder, out_dir, instruction=self.instruction, prompts=self.prompts,
                               state_dict=state_dict)

    def export_ready(self) -> None:
        from qwen3train.models.export import export_tokenizer

        export_tokenizer(self.embedder)

