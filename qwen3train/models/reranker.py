"""The Qwen3 yes/no reranker: official prompt, document-only truncation, two-row LM head.

Other backbones: the prompt around the pair comes from the model's own chat template (system message
= the official instruction to judge, user message = the pair, generation prompt, thinking off), which
for a Qwen3 tokenizer reproduces the official strings exactly; the "yes"/"no" ids come from the
model's own tokenizer (9693 / 2152 only for Qwen vocabularies) and must be single tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from qwen3train.errors import ConfigError
from qwen3train.models import fit as fitting
from qwen3train.models import packing
from qwen3train.models.pooling import last_token_pool
from qwen3train.text import pad_batch, tokenize_capped

RERANK_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct '
    'provided. Note that the answer can only be "yes" or "no".'
)
RERANK_PREFIX = f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_BODY = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def reranker_prompt(tokenizer) -> tuple[str, str]:
    """(prefix, suffix) around the ``<Instruct>/<Query>/<Document>`` body, from the tokenizer's chat
    template (the official Qwen3 strings for a tokenizer without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return RERANK_PREFIX, RERANK_SUFFIX
    marker = "\u0000BODY\u0000"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": RERANK_SYSTEM},
                                              {"role": "user", "content": marker}],
                                             tokenize=False, add_generation_prompt=True, enable_thinking=False)
    except Exception as e:  # noqa: BLE001 - a template's own error, reported with what the reranker needs
        raise ConfigError(f"the tokenizer's chat template cannot render a system + user conversation, which the "
                         f"reranker prompt needs: {e}") from e
    if text.count(marker) != 1:
        raise ConfigError("the tokenizer's chat template does not render the reranker's user message once")
    prefix, suffix = text.split(marker)
    return prefix, suffix


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """Ids of "yes" and "no" in this tokenizer; each must be one token."""
    out = []
    for word in ("yes", "no"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"the reranker needs {word!r} to be one token; this tokenizer gives {ids}")
        out.append(int(ids[0]))
    return out[0], out[1]


class RerankPrompt:
    """The reranker's input ids, without a model (``Reranker`` and ``make score``'s vLLM teacher use it alike):
    the prompt around the pair from the tokenizer (``reranker_prompt``), its "yes"/"no" ids, and the token budget
    ``max_length`` in which prefix and suffix are always kept and the document is cut."""

    def __init__(self, tokenizer, max_length: int = 8192,
                 default_instruction: str = DEFAULT_RERANK_INSTRUCTION) -> None:
        self.tokenizer, self.max_length, self.default_instruction = tokenizer, max_length, default_instruction
        self.prefix, self.suffix = reranker_prompt(tokenizer)
        self.prefix_ids = tokenizer.encode(self.prefix, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(self.suffix, add_special_tokens=False)
        self.yes_id, self.no_id = yes_no_ids(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        if self.max_length <= len(self.prefix_ids) + len(self.suffix_ids) + 8:
            raise ConfigError(f"max_length {max_length} leaves no room for the query and document")

    def token_ids(self, queries: Sequence[str], docs: Sequence[str],
                  instructions: Sequence[str | None] | None = None) -> list[list[int]]:
        """``prefix + body + suffix`` per pair; only the tail of the body (the document) is cut.

        The body is tokenized whole (as the official recipe does), so tokens at the
        ``<Document>: `` boundary match it exactly; if even the instruction and query overflow the
        budget, the query's tail is cut and the document is dropped rather than the prompt.
        """
        if instructions is None:
            instructions = [None] * len(queries)
        budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        bodies = [
            RERANK_BODY.format(instruction=i or self.default_instruction, query=q, document=d)
            for q, d, i in zip(queries, docs, instructions)
        ]
        enc = tokenize_capped(self.tokenizer, bodies, budget)
        return [self.prefix_ids + list(ids) + self.suffix_ids for ids in enc]


class Reranker(nn.Module):
    """Qwen3 causal LM scored as a yes/no classifier (spec §3).

    ``score = sigmoid(z_yes - z_no)`` at the last position, which equals the official recipe's
    softmax over the full-vocabulary logits restricted to ``[no, yes]``. Only the two LM-head rows
    are computed (``h @ W[[no, yes]].T``), never the 151,936-row projection.

    Args:
        lm: ``AutoModelForCausalLM`` (optionally PEFT-wrapped).
        tokenizer: its tokenizer.
        max_length: total token budget; prefix and suffix are always kept, the document is cut.
        padding_side: batch padding side (the official recipe uses left).
        packing / pack_multiple / pack_share: as for ``Embedder``: the packed attention backend the LM was
            loaded with (None: padded batches); the logits are read at each sequence's own last position;
            the prompt, instruction and query before a query's documents run once per pack (pack_share).
    """

    def __init__(self, lm: nn.Module, tokenizer, *, max_length: int = 8192, padding_side: str = "left",
                 default_instruction: str = DEFAULT_RERANK_INSTRUCTION, packing: str | None = None,
                 pack_multiple: int = 1, pack_grouped: bool = True, pack_tokens: int | None = None,
                 pack_share: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.padding_side = padding_side
        self.packing, self.pack_multiple, self.pack_grouped = packing, pack_multiple, pack_grouped
        self.pack_tokens = pack_tokens
        self.pack_share = pack_share
        self.fit = fitting.Fit()  # what one inference forward holds, once it ran out of memory (models/fit.py)
        p = RerankPrompt(tokenizer, max_length, default_instruction)
        self.tokenizer, self.max_length, self.default_instruction = p.tokenizer, p.max_length, p.default_instruction
        self.prefix, self.suffix, self.prefix_ids, self.suffix_ids = p.prefix, p.suffix, p.prefix_ids, p.suffix_ids
        self.yes_id, self.no_id, self.pad_id = p.yes_id, p.no_id, p.pad_id

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    token_ids = RerankPrompt.token_ids  # from this model's own attributes (max_length, default_instruction)

    def pad(self, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        return pad_batch(seqs, self.pad_id, self.padding_side)

    def pack(self, seqs: Sequence[Sequence[int]]) -> packing.Packed:
        """Token id lists -> packed rows for ``forward(**packed.inputs(device))``."""
        return packing.pack_rows(seqs, self.pad_id, self.packing, self.pack_multiple, self.pack_grouped,
                                 self.pack_tokens, self.pack_share)

    def inputs(self, seqs: Sequence[Sequence[int]]) -> dict:
        """``forward`` keyword arguments for these prompts on the model's device, packed or padded."""
        if self.packing:
            return self.pack(seqs).inputs(self.device)
        return {k: v.to(self.device) for k, v in self.pad(seqs).items()}

    def yes_no_logits(self, h: torch.Tensor, with_logsumexp: bool = False) -> torch.Tensor:
        """``[B, 2]`` logits ``(z_no, z_yes)`` from the last-position hidden states ``h [B, D]``,
        through two LM-head rows.

        ``with_logsumexp`` appends a third column, ``log sum_v exp(z_v)`` over the whole vocabulary at
        that position only (what the paper's SFT cross-entropy needs): one ``[B, V]`` product for the
        batch, never the ``[B, L, V]`` projection of every position.
        """
        head = self.lm.get_output_embeddings()
        rows = torch.tensor([self.no_id, self.yes_id], device=h.device)
        logits = h @ head.weight[rows].T  # [B, 2]
        if head.bias is not None:
            logits = logits + head.bias[rows]
        if not with_logsumexp:
            return logits.float()
        full = head(h).float()  # [B, V] at the last position only
        return torch.cat([logits.float(), torch.logsumexp(full, dim=-1, keepdim=True)], dim=1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                with_logsumexp: bool = False, *, packed: list[dict] | None = None,
                last: list[torch.Tensor] | None = None, order: torch.Tensor | None = None):
        """``[B, 2]`` (or ``[B, 3]``) as ``yes_no_logits``, for a padded batch (``input_ids``,
        ``attention_mask``) or packed rows (``**self.pack(seqs).inputs(device)``); the relevance logit is
        ``z_yes - z_no``."""
        decoder = self.lm.get_decoder()
        if packed is None and self.packing:  # a padded batch given to a packed model: pack it
            kw = self.pack(packing.unpad(input_ids, attention_mask)).inputs(input_ids.device)
            packed, last, order = kw["packed"], kw["last"], kw["order"]
        if packed is not None:  # each row's hidden states [1, T, D] at each sequence's last token
            outs = [decoder(**kw, use_cache=False).last_hidden_state[0].index_select(0, at)
                    for kw, at in zip(packed, last)]
            h = outs[0] if order is None else torch.cat(outs).index_select(0, order)  # [B, D]
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            h = last_token_pool(hidden, attention_mask)  # [B, D]
        return self.yes_no_logits(h, with_logsumexp)

    def score(self, query: str, docs: Sequence[str], instruction: str | None = None,
              batch_size: int = 16) -> torch.Tensor:
        """Probability of "yes" for each document: ``[len(docs)]`` float32 in ``[0, 1]``."""
        return torch.sigmoid(self.relevance([query] * len(docs), docs, [instruction] * len(docs), batch_size))

    @torch.inference_mode()
    def relevance(self, queries: Sequence[str], docs: Sequence[str], instructions: Sequence[str | None],
                  batch_size: int = 16) -> torch.Tensor:
        """The relevance logit ``z_yes - z_no`` of each (query, document, instruction): ``[len(docs)]`` float32
        (its sigmoid is the probability of "yes"; a teacher's score for distillation, ``make score``)."""
        was_training = self.training
        self.eval()
        ids = self.token_ids(queries, docs, instructions)
        lengths, retry = [len(x) for x in ids], not fitting.partitioned(self)
        out = []
        for b in range(0, len(ids), batch_size):
            for _, z in fitting.forward_in_pieces(self.fit, list(range(b, min(b + batch_size, len(ids)))), lengths,
                                                  lambda sel: self(**self.inputs([ids[k] for k in sel])),
                                                  padded=not self.packing, retry=retry, what="reranking"):
                out.append((z[:, 1] - z[:, 0]).cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0)
