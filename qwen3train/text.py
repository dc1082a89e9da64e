"""Text formatting and tokenization for Qwen3 embedders: the one place these conventions live.

Conventions (spec §1.2-1.4):
- a query is ``Instruct: {instruction}\\nQuery:{query}`` (no space after ``Query:``; template
  configurable); with no instruction the query is used raw;
- a document is raw text (asymmetric tasks); symmetric tasks give documents the same instruction;
- the content is truncated to ``max_length - 1`` tokens and the end token is appended explicitly,
  exactly once, whatever the tokenizer's own post-processor does. Which token (``resolve_end_token``):
  the configured one (``model.end_token``), else the family's end-of-text token (Qwen and SmolLM2:
  ``<|endoftext|>``, id 151643 for Qwen, never its ``eos_token`` ``<|im_end|>``; Llama 3:
  ``<|end_of_text|>``), else the tokenizer's ``eos_token``;
- pooling reads the attention mask, never token ids: the pad id is the same 151643.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qwen3train.errors import ConfigError

ENDOFTEXT = "<|endoftext|>"
# end-of-text markers by family, in order of preference: Qwen / GPT-2 / SmolLM2, then Llama 3
END_OF_TEXT_TOKENS = (ENDOFTEXT, "<|end_of_text|>")
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{query}"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_query(query: str, instruction: str | None, template: str = DEFAULT_QUERY_TEMPLATE) -> str:
    """Apply the instruction template to a query; an empty or missing instruction leaves it raw."""
    if not instruction:
        return query
    return template.format(instruction=instruction, query=query)


def query_prompt(instruction: str, template: str = DEFAULT_QUERY_TEMPLATE) -> str:
    """The prefix a query gets (what sentence-transformers stores as the ``query`` prompt)."""
    marker = "\u0000QUERY\u0000"
    text = template.format(instruction=instruction, query=marker)
    if not text.endswith(marker):
        raise ValueError(f"query template must end with {{query}} to be used as a prompt: {template!r}")
    return text[: -len(marker)]


class _Vocab:
    """``token in _Vocab(tokenizer)`` == ``token in tokenizer.get_vocab()``, asked of a fast tokenizer's backend
    without building the vocabulary's dict (151k entries for Qwen: ~0.14 s, twice for every model loaded)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.backend = tokenizer, getattr(tokenizer, "backend_tokenizer", None)

    def __contains__(self, token: str) -> bool:
        if self.backend is not None:
            return self.backend.token_to_id(token) is not None
        return token in self.tokenizer.get_vocab()


def resolve_end_token(tokenizer, configured: str | None = None) -> str:
    """The token every embedder input ends with: ``configured``, else the family's end-of-text token,
    else ``eos_token``. A token counts when it is in the vocabulary (SmolLM2's ``<|endoftext|>`` is id 0
    and also its unk token, and is still a real token)."""
    vocab = _Vocab(tokenizer)
    if configured:
        if configured not in vocab:
            raise ConfigError(f"model.end_token={configured!r} is not a token of this tokenizer")
        return configured
    for token in END_OF_TEXT_TOKENS:
        if token in vocab:
            return token
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in vocab:
        return eos
    raise ConfigError("the tokenizer has no end-of-text token and no eos_token: set model.end_token")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """Pad id lists into ``input_ids``/``attention_mask`` tensors on the ``side`` given."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


# A text is cut before tokenizing when it is far longer than its token budget could cover: a fast tokenizer
# tokenizes the whole text before truncating (a 10 MB document: 6.8 s and 1.5 GB for its 511 tokens), so one
# huge field far into a run stalled its batch or ran the host out of memory. The cut keeps
# ``budget * longest token + CUT_SLACK`` characters: the budget's tokens cover at most ``budget * longest``
# of them, and the slack completes the word in progress. A cut text that gives fewer tokens than the budget
# (a normalizer that deletes characters) is tokenized whole again, so the tokens are those of the whole text.
CUT_SLACK = 1024


def _longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (an upper bound of the text one token covers:
    a byte-level entry spells one character per byte); computed once per tokenizer."""
    n = getattr(tokenizer, "_qwen3train_longest", None)
    if n is None:
        n = max(map(len, tokenizer.get_vocab()), default=1)
        try:
            tokenizer._qwen3train_longest = n
        except AttributeError:
            pass
    return n


def tokenize_capped(tokenizer, texts: Sequence[str], budget: int) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]``,
    with each text far longer than ``budget`` tokens could cover cut first (see ``CUT_SLACK``)."""
    full, texts, cut = texts, list(texts), []
    if any(len(t) > 16 * budget + CUT_SLACK for t in texts):  # cheap test first: the vocabulary is read only then
        limit = budget * _longest_token(tokenizer) + CUT_SLACK
        cut = [i for i, t in enumerate(texts) if len(t) > limit]
        for i in cut:
            texts[i] = texts[i][:limit]
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
    redo = [i for i in cut if len(ids[i]) < budget]  # the cut took tokens the budget holds: the whole text
    if redo:
        again = tokenizer([full[i] for i in redo], add_special_tokens=False, truncation=True, max_length=budget)
        ids = list(ids)
        for i, row in zip(redo, again["input_ids"]):
            ids[i] = row
    return ids


@dataclass
class EmbeddingTokenizer:
    """Turns texts into padded ``input_ids``/``attention_mask`` with exactly one trailing end token.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow).
        end_token: the token appended to every input; None: ``resolve_end_token``'s rule
            (Qwen3: ``<|endoftext|>``).
        padding_side: ``"right"`` (training default) or ``"left"`` (official inference default);
            pooling is correct for both.
    """

    tokenizer: object
    end_token: str | None = None
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.end_token = resolve_end_token(self.tokenizer, self.end_token)
        self.end_id = int(self.tokenizer.convert_tokens_to_ids(self.end_token))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.end_id

    def token_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Content tokens truncated to ``max_length - 1``, then the end token, once."""
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (content + end token), got {max_length}")
        enc = tokenize_capped(self.tokenizer, texts, max_length - 1)
        out = []
        for ids in enc:
            ids = list(ids)
            while ids and ids[-1] == self.end_id:  # content that already ends in the marker
                ids.pop()
            out.append(ids + [self.end_id])
        return out

    def pad(self, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Pad id lists to a batch on the configured side."""
        return pad_batch(seqs, self.pad_id, self.padding_side)

    def __call__(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.pad(self.token_ids(texts, max_length))
