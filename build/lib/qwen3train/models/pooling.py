"""Pooling and normalisation as pure functions over tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position per row, for left *or* right padding.

    ``(mask * (pos + 1)).argmax`` picks the largest position whose mask is 1; it needs no
    assumption about the padding side and never looks at token ids (Qwen3's pad id equals the
    appended end token).
    """
    pos = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.to(pos.dtype) * pos).argmax(dim=1)  # [B]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last valid position: ``hidden [B, L, D]`` -> ``[B, D]``."""
    idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def normalize(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Matryoshka truncation then L2 normalisation: keep the first ``dim`` values, then normalise.

    Truncation must come before normalisation (spec §1.6); ``dim=None`` keeps the full vector.
    """
    if dim is not None:
        if dim < 1 or dim > x.shape[-1]:
            raise ValueError(f"dim must be in [1, {x.shape[-1]}], got {dim}")
        x = x[..., :dim]
    return F.normalize(x.float(), p=2, dim=-1)
