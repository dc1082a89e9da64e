"""The Qwen3 embedder: causal decoder -> last-token pooling -> (Matryoshka) -> L2 normalise."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qwen3train.models import fit as fitting
from qwen3train.models import packing
from qwen3train.models.pooling import last_token_pool, normalize
from qwen3train.text import DEFAULT_QUERY_TEMPLATE, EmbeddingTokenizer, format_query

MIN_BUCKET_ROWS = 8  # a smaller group costs more in kernel launches than its padding saves


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
        length_buckets: padded mode only: in ``forward``, rows are sorted by length and run in up to
            this many groups, each cut to its own longest row (1: one padded batch; None: 4 on the
            CPU, 1 on CUDA). A row's result does not depend on the padding around it (causal
            attention, masked pads), so this only removes work.
        packing: the packed attention backend (``qwen3train.models.packing``) the backbone was
            loaded with, or None for padded batches. Packed, every forward (training and ``encode``)
            runs its sequences as one row without padding.
        pack_multiple: packed rows are rounded up to a multiple of this many tokens (few shapes for
            compiled graphs); 1 = no filler.
        pack_grouped: the padded backend runs attention per group of similar lengths (False: one
            block, one shape: for compiled layers).
        pack_tokens: real tokens per packed row (more rows, each its own pass through the backbone,
            within one forward); None: one row.
        pack_share: sequences beginning with at least this many equal tokens run them once (queries
            with one instruction); 0: off.
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
        length_buckets: int | None = 1,
        packing: str | None = None,
        pack_multiple: int = 1,
        pack_grouped: bool = True,
        pack_tokens: int | None = None,
        pack_share: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.query_template = query_template
        self.max_query_length = max_query_length
        self.max_doc_length = max_doc_length
        self.tok = EmbeddingTokenizer(tokenizer, end_token=end_token, padding_side=padding_side)
        if length_buckets is not None and length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1, got {length_buckets}")
        self.length_buckets = length_buckets
        self.packing = packing
        self.pack_multiple = pack_multiple
        self.pack_grouped = pack_grouped
        self.pack_tokens = pack_tokens
        self.pack_share = pack_share
        self.fit = fitting.Fit()  # what one inference forward holds, once it ran out of memory (models/fit.py)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                doc_input_ids: torch.Tensor | None = None, doc_attention_mask: torch.Tensor | None = None, *,
                packed: list[dict] | None = None, last: list[torch.Tensor] | None = None,
                order: torch.Tensor | None = None):
        """``[B, L]`` token ids and mask -> ``[B, D]`` pooled hidden state (not normalised).

        With ``doc_*`` also given, both towers run in this one call and a pair is returned: DDP and
        DeepSpeed then see a single forward per backward, and each tower pads to its own length.
        Packed: ``forward(**self.pack(seqs).inputs(device))`` -> ``[n, D]``, every sequence of the pack
        (queries and documents together) in one forward. A packed embedder given a padded batch packs
        it first (same results).
        """
        if packed is not None:
            return self._pool_packed(packed, last, order)
        if self.packing:
            seqs = packing.unpad(input_ids, attention_mask)
            if doc_input_ids is not None:
                seqs += packing.unpad(doc_input_ids, doc_attention_mask)
            pooled = self._pool_packed(**self.pack(seqs).inputs(input_ids.device))
            n = input_ids.shape[0]
            return pooled if doc_input_ids is None else (pooled[:n], pooled[n:])
        pooled = self._pool_bucketed(input_ids, attention_mask)
        if doc_input_ids is None:
            return pooled
        return pooled, self._pool_bucketed(doc_input_ids, doc_attention_mask)

    def pack(self, seqs) -> packing.Packed:
        """Token id lists -> packed rows for ``forward(**packed.inputs(device))``."""
        return packing.pack_rows(seqs, self.tok.pad_id, self.packing, self.pack_multiple, self.pack_grouped,
                                 self.pack_tokens, self.pack_share)

    def _pool_packed(self, packed: list[dict], last: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
        # each row's hidden states [1, T, D] read at each sequence's own last token -> [n, D], input order
        outs = [self.backbone(**kw, use_cache=False).last_hidden_state[0].index_select(0, at)
                for kw, at in zip(packed, last)]
        pooled = outs[0] if order is None else torch.cat(outs).index_select(0, order)
        return pooled.float()

    def _pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        # similarities, the temperature and the loss in float32 whatever the compute dtype (bf16 autocast)
        return last_token_pool(out.last_hidden_state, attention_mask).float()

    def _pool_bucketed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``_pool`` over groups of rows of similar length, each cut to its longest row.

        A contrastive batch cannot be sorted by length (its rows are its negatives), but within one
        forward the rows are independent: sorted and split into ``length_buckets`` equal groups
        (never under ``MIN_BUCKET_ROWS`` rows), each group drops the pad columns it does not need.
        On typical retrieval batches (short queries, a long tail of passages) this removes about
        half of the padded tokens. Results come back in input order; gradients flow through the
        index operations unchanged."""
        n, width = input_ids.shape
        buckets = self.length_buckets or (1 if input_ids.is_cuda else 4)
        k = min(buckets, n // MIN_BUCKET_ROWS)
        if k <= 1:
            return self._pool(input_ids, attention_mask)
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_len = lengths[order].tolist()
        left = self.tok.padding_side == "left"
        bounds = [n * g // k for g in range(k + 1)]
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            sel = order[a:b]
            w = max(int(sorted_len[a]), 1)
            cols = slice(width - w, width) if left else slice(0, w)
            parts.append(self._pool(input_ids[sel][:, cols], attention_mask[sel][:, cols]))
        pooled = torch.cat(parts)
        return pooled[torch.argsort(order)]

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
        batch_tokens: int | None = None,
        progress: str | None = None,
    ) -> torch.Tensor:
        """Embed texts; returns ``[N, dim or D]`` float32, L2-normalised, in input order.

        With ``instruction`` the texts are queries (``Instruct: ...\\nQuery:...``), otherwise they
        are encoded raw (documents). Inputs are sorted by length within blocks of ``block_size``
        texts; padded, each batch holds ``batch_size`` texts; packed, each forward holds as many
        texts as fit in ``batch_tokens`` real tokens (default ``batch_size x max_length``: the
        padded batch's worst case), so short texts go many at a time. Results come back in input order.
        ``progress``: a label for the progress bar (``qwen3train.progress``); None: silent.
        """
        from qwen3train.progress import Progress

        was_training = self.training
        self.eval()
        if max_length is None:
            max_length = self.max_query_length if instruction else self.max_doc_length
        budget = batch_tokens or batch_size * max_length
        texts = [format_query(t, instruction, self.query_template) for t in texts]
        out = torch.empty((len(texts), dim or self.hidden_size), dtype=torch.float32)
        dev = self.device
        bar = Progress(len(texts), progress, "texts")
        retry = not fitting.partitioned(self)

        def run(sel: list[int]) -> torch.Tensor:
            if self.packing:
                return self._pool_packed(**self.pack([ids[k] for k in sel]).inputs(dev))
            batch = {k: packing.to_device(v, dev) for k, v in self.tok.pad([ids[k] for k in sel]).items()}
            return self._pool(**batch)  # already sorted by length

        for start in range(0, len(texts), block_size):
            ids = self.tok.token_ids(texts[start : start + block_size], max_length)
            lengths = [len(x) for x in ids]
            order = sorted(range(len(ids)), key=lambda k: -lengths[k])
            done, where = [], []  # a block's vectors stay on the device until its end: no wait between forwards
            for sel in (token_groups(order, lengths, budget) if self.packing
                        else [order[b : b + batch_size] for b in range(0, len(order), batch_size)]):
                for piece, pooled in fitting.forward_in_pieces(self.fit, sel, lengths, run, padded=not self.packing,
                                                               retry=retry, what="encoding"):
                    done.append(normalize(pooled, dim))
                    where += piece
                    bar.update(len(piece))
            if done:
                out[torch.tensor(where) + start] = torch.cat(done).cpu()
        bar.close()
        self.train(was_training)
        return out


def token_groups(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """``order`` cut into consecutive groups of at most ``budget`` tokens (a longer item alone)."""
    groups, cur, used = [], [], 0
    for k in order:
        if cur and used + lengths[k] > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(k)
        used += lengths[k]
    if cur:
        groups.append(cur)
    return groups
