"""The Qwen3 embedder: causal decoder -> last-token pooling -> (Matryoshka) -> L2 normalise."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qwen3train.models.pooling import last_token_pool, normalize
from qwen3train.text import DEFAULT_QUERY_TEMPLATE, EmbeddingTokenizer, format_query


class Embedder(nn.Module):
    """Wraps any Hugging Face decoder (``AutoModel``) as a text embedder.

    ``forward`` returns the *un-normalised* pooled vector, so that Matryoshka truncation can happen
    before normalisation (the loss and ``encode`` normalise); ``encode`` is the user-facing API.

    Args:
        backbone: a decoder returning ``last_hidden_state`` (e.g. ``Qwen3Model``), optionally a PEFT
            model wrapping one.
        tokenizer: its Hugging Face tokenizer.
        query_template: how an instruction and a query are joined (spec §1.2).
        max_query_length / max_doc_length: token budgets including the appended end token.
        padding_side: batch padding side; pooling is correct for both.
        end_token: the token appended to every input (None: the family rule, ``text.resolve_end_token``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        *,
        query_template: str = DEFAULT_QUERY_TEMPLATE,
        max_query_length: int = 512,
        max_doc_length: int = 512,
        padding_side: str = "right",
        end_token: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.query_template = query_template
        self.max_query_length = max_query_length
        self.max_doc_length = max_doc_length
        self.tok = EmbeddingTokenizer(tokenizer, end_token=end_token, padding_side=padding_side)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                doc_input_ids: torch.Tensor | None = None, doc_attention_mask: torch.Tensor | None = None):
        """``[B, L]`` token ids and mask -> ``[B, D]`` pooled hidden state (not normalised).

        With ``doc_*`` also given, both towers run in this one call and a pair is returned: DDP and
        DeepSpeed then see a single forward per backward, and each tower pads to its own length.
        """
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        # similarities, the temperature and the loss in float32 whatever the compute dtype (bf16 autocast)
        pooled = last_token_pool(out.last_hidden_state, attention_mask).float()
        if doc_input_ids is None:
            return pooled
        return pooled, self(doc_input_ids, doc_attention_mask)

    # ---- tokenization -------------------------------------------------------------------------
    def tokenize_queries(
        self, queries: Sequence[str], instructions: Sequence[str | None]
    ) -> dict[str, torch.Tensor]:
        texts = [format_query(q, i, self.query_template) for q, i in zip(queries, instructions)]
        return self.tok(texts, self.max_query_length)

    def tokenize_docs(
        self, docs: Sequence[str], instructions: Sequence[str | None] | None = None
    ) -> dict[str, torch.Tensor]:
        if instructions is not None:  # symmetric tasks: documents get the instruction too
            docs = [format_query(d, i, self.query_template) for d, i in zip(docs, instructions)]
        return self.tok(list(docs), self.max_doc_length)

    # ---- inference ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        dim: int | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        block_size: int = 8192,
    ) -> torch.Tensor:
        """Embed texts; returns ``[N, dim or D]`` float32, L2-normalised, in input order.

        With ``instruction`` the texts are queries (``Instruct: ...\\nQuery:...``), otherwise they
        are encoded raw (documents). Inputs are sorted by length within blocks of ``block_size``
        texts so each batch pads little; results are put back in input order.
        """
        was_training = self.training
        self.eval()
        if max_length is None:
            max_length = self.max_query_length if instruction else self.max_doc_length
        texts = [format_query(t, instruction, self.query_template) for t in texts]
        out = torch.empty((len(texts), dim or self.hidden_size), dtype=torch.float32)
        for start in range(0, len(texts), block_size):
            ids = self.tok.token_ids(texts[start : start + block_size], max_length)
            order = sorted(range(len(ids)), key=lambda k: -len(ids[k]))
            for b in range(0, len(order), batch_size):
                sel = order[b : b + batch_size]
                batch = self.tok.pad([ids[k] for k in sel])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                vec = normalize(self(**batch), dim).cpu()
                out[torch.tensor(sel) + start] = vec
        self.train(was_training)
        return out
