"""Inference forwards that fit the device: a forward that runs out of memory is run again in halves.

Encoding (evaluation, the dev evaluation inside a training run, the cosine filter, mining) and the
reranker's scoring cut their inputs into forwards of a fixed size (``batch_tokens`` real tokens packed,
``batch_size`` rows padded). Whether that size fits depends on what else holds the device: during
training the optimizer state does, so a dev evaluation hours into a run could stop it where the same
evaluation alone fits. Inference changes no state, so a forward that fails can be run again smaller:
``forward_in_pieces`` halves the group that failed (again, down to one text), remembers the size that
fits on the model (``Fit``, so later groups and later calls start there) and says so once per model.
Results are the same vectors in the same order (each text's result depends only on its own tokens).

Not where the parameters are ZeRO-3 partitions: a forward gathers them layer by layer together with the
other ranks, and a rank that starts its forward again alone would pair its gathers with theirs wrongly.
There, and for one text too long for the device, it is one line (``OutOfMemory``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from qwen3train.errors import OutOfMemory


class Fit:
    """What one model's inference forwards have been found to hold (None: not limited yet)."""

    def __init__(self) -> None:
        self.cap: int | None = None  # in cost units: real tokens (packed) or rows x longest row (padded)
        self.noted = False


def partitioned(module: torch.nn.Module) -> bool:
    """Parameters held as ZeRO-3 partitions (DeepSpeed marks each with ``ds_id``) or FSDP shards (DTensors):
    every rank gathers them in the same forwards, so one rank cannot retry alone."""
    p = next(module.parameters(), None)
    return p is not None and (hasattr(p, "ds_id") or type(p).__name__ == "DTensor")


def cost(lengths: Sequence[int], group: Sequence[int], padded: bool) -> int:
    """A forward's size: its real tokens packed; rows x its longest row padded."""
    if padded:
        return len(group) * max((lengths[k] for k in group), default=0)
    return sum(lengths[k] for k in group)


def split(group: Sequence[int], lengths: Sequence[int], cap: int, padded: bool) -> list[list[int]]:
    """``group`` cut into consecutive pieces of at most ``cap`` (a larger single item alone)."""
    pieces: list[list[int]] = []
    cur: list[int] = []
    total = longest = 0
    for k in group:
        longest = max(longest, lengths[k])
        total += lengths[k]
        if cur and ((len(cur) + 1) * longest if padded else total) > cap:
            pieces.append(cur)
            cur, total, longest = [], lengths[k], lengths[k]
        cur.append(k)
    if cur:
        pieces.append(cur)
    return pieces


def forward_in_pieces(fit: Fit, group: list[int], lengths: Sequence[int], run: Callable[[list[int]], object], *,
                      padded: bool, retry: bool, what: str) -> Iterator[tuple[list[int], object]]:
    """``(piece, run(piece))`` for pieces of ``group`` in order; pieces as large as ``fit`` allows.

    ``run`` does one forward; ``retry`` False (ZeRO-3 partitions) lets its out-of-memory error stop it.
    ``what`` names the work in the note and the error ("encoding", "reranking")."""
    pending = split(group, lengths, fit.cap, padded) if fit.cap else [group]
    while pending:
        piece = pending.pop(0)
        try:
            out, failed = run(piece), False
        except Exception as e:  # noqa: BLE001 - only out of memory is caught; anything else is re-raised
            if not is_out_of_memory(e):
                raise
            if not retry or len(piece) == 1:
                raise _too_big(lengths, piece, what, retry) from None
            failed = True
        if not failed:
            yield piece, out
            continue
        size = cost(lengths, piece, padded)  # out of the except block: its frames (and tensors) are gone
        fit.cap = max(size // 2, 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not fit.noted:
            fit.noted = True
            unit = "rows x longest row" if padded else "tokens"
            print(f"note: out of device memory {what} {size:,} {unit} in one forward; going on with at most "
                  f"{fit.cap:,} per forward (the same results, more forwards)", flush=True)
        pending[:0] = split(piece, lengths, fit.cap, padded)


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or one raised from it (``raise ... from``: compiled code may wrap it)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        e, seen = e.__cause__, seen + 1
    return False


def _too_big(lengths: Sequence[int], piece: list[int], what: str, retry: bool) -> OutOfMemory:
    n = max(lengths[k] for k in piece)
    if retry:
        return OutOfMemory(f"out of device memory {what} a single text of {n:,} tokens: lower the maximum length "
                           f"(max_length / max_doc_length) or free the device")
    return OutOfMemory(f"out of device memory {what} {len(piece)} text(s) of up to {n:,} tokens with "
                       f"parameters sharded over the ranks (ZeRO-3 or FSDP; no retry: the ranks gather them together); "
                       f"lower the batch of this evaluation or use ZeRO 1-2 or the torch engine")
