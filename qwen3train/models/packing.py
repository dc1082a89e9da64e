"""Padding-free (packed) forward: a micro-batch's sequences in one row, attention kept inside each.

A padded batch of retrieval texts is mostly padding (short queries beside a long tail of passages:
2.75 padded tokens per real one on the Qwen3-0.6B benchmark). Packed, the ``n`` sequences are
concatenated into one row ``[1, T]`` with ``T = sum(lengths)``; position ids restart at 0 for every
sequence, so rotary embeddings see exactly the positions they would see alone; every projection, norm
and MLP runs on real tokens only; attention is restricted to each sequence by one of these backends
(``model.packed_attention``):

* ``flash``: transformers' own ``flash_attention_2`` with ``cu_seq_lens_*`` (needs ``flash-attn``, CUDA);
* ``varlen``: torch's variable-length FlashAttention (``torch.nn.attention.varlen``, CUDA);
* ``flex``: FlexAttention with a block mask (document id equal and causal), which skips every block
  that lies outside a sequence (CUDA; on the CPU it runs forward only);
* ``padded``: exact on any device: inside attention only, queries, keys and values are scattered into
  a right-padded ``[n, H, L_max, d]`` block and run through SDPA with the causal flag. A real token at
  position ``p`` sees positions ``<= p`` of its own row, all real, so nothing is masked by value and no
  sequence can reach another (different rows). Used on the CPU.

``auto`` picks ``flash`` where ``flash-attn`` is installed on CUDA, else ``varlen`` where torch has it
(checked once with a tiny forward and backward), else ``flex``; ``padded`` on the CPU.

**Shared prefixes** (``model.share_prefix``): sequences of a pack that begin with the same tokens (the
reranker's prompt, instruction and query before each of a query's documents; an embedder's instruction
before its queries) are cut at their longest common prefix: the prefix runs once, as a segment of its own,
and each remainder runs as a segment at positions ``P, P+1, ...`` whose tokens attend to the prefix's keys
and values and causally to their own. Causal attention makes the prefix's states independent of what
follows, so every result is the one the whole sequence gives alone (to rounding), and the gradient of the
prefix is the sum over the sequences that share it. The groups are chosen to save the most tokens (one
partition of the sequences in token order, by dynamic programming); a prefix shorter than the threshold is
not shared. Backends: ``padded`` (exact, the CPU) and ``flex`` (the mask admits the parent's tokens); the
``varlen`` backend gathers each remainder's keys (prefix + own) and is used only where a start-up check
shows it equal to the exact path; ``flash`` does not share.

The attention functions, the choice of backend and its checks live in ``qwen3train.models.packed_attention``.

The pooled vector (embedder) or the yes/no logits (reranker) are read at each sequence's own last
token (``Pack.last``), never padded back. ``pack_multiple`` > 1 rounds ``T`` up with filler
sequences (pad tokens in segments of their own, never read) so that compiled graphs and CUDA graphs
see a few shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch



GROUP_RATIO = 0.75  # padded backend: a new attention block starts when a sequence is < 75% of the block's longest
SHARE_WINDOW = 64  # shared-prefix groups hold at most this many sequences (bounds the partition's cost: 1,300
# queries under one instruction took 121 ms at 256; a group of 64 runs its prefix 1/64 as often as alone)
SHARING_BACKENDS = ("padded", "flex", "varlen")


def share_groups(seqs: Sequence[Sequence[int]], min_len: int) -> list[tuple[int, list[int]]]:
    """Groups of at least two sequences that begin with the same ``P >= min_len`` tokens: ``[(P, [indices])]``,
    chosen to save the most tokens (``(members - 1) * P`` per group). Sequences sharing a prefix are
    neighbours in token order, so the best partition of that order (dynamic programming over it) is the
    best grouping; every member keeps at least one token of its own. Sequences in no group are left out."""
    n = len(seqs)
    if min_len < 1 or n < 2:
        return []
    order = sorted(range(n), key=lambda i: seqs[i])
    adj = []  # common leading tokens of neighbours in that order
    for a, b in zip(order, order[1:]):
        x, y = seqs[a], seqs[b]
        m, k = min(len(x), len(y)), 0
        while k < m and x[k] == y[k]:
            k += 1
        adj.append(k)
    size = [len(seqs[k]) for k in order]
    best = [0] * (n + 1)  # most tokens saved by the first i sequences of the order
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last group, its prefix; 0 = alone)
    for i in range(1, n + 1):
        top, where = best[i - 1], (i - 1, 0)
        prefix = size[i - 1] - 1  # min(common leading tokens, shortest - 1) of the group order[j:i]
        for j in range(i - 2, max(-1, i - 1 - SHARE_WINDOW), -1):
            if adj[j] < prefix:
                prefix = adj[j]
            if size[j] <= prefix:
                prefix = size[j] - 1
            if prefix < min_len:
                break  # only falls as j moves down
            if best[j] + (i - j - 1) * prefix > top:
                top, where = best[j] + (i - j - 1) * prefix, (j, prefix)
        best[i], cut[i] = top, where
    groups, i = [], n
    while i > 0:
        j, prefix = cut[i]
        if prefix:
            groups.append((prefix, sorted(order[j:i])))
        i = j
    return groups[::-1]


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on ``dev`` without holding up the host: to a GPU through page-locked memory, so the copy
    queues behind the work already on the stream (from pageable memory the driver may wait for that work
    first, and the host could not run ahead of the GPU); torch's pinned-memory cache keeps the buffer until
    the copy is done."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


@dataclass
class Pack:
    """``n`` token sequences as one row. Tensors are on the CPU until ``inputs(device)``.

    The row holds the sequences longest first (with the shared prefixes and the filler segments), then
    the remainders of each shared-prefix group; ``last[i]`` is where input sequence ``i`` ends, so callers
    read results in their own order. input_ids / position_ids: ``[1, T]``; last: ``[n]``; cu_seqlens:
    ``[s + 1]`` int32 boundaries of every segment; parent: ``[s]`` the segment whose tokens each segment
    also attends to (a shared prefix; -1 none); max_len: the longest segment; num_tokens: real tokens of
    the sequences (``sum(lengths)``, shared prefixes counted in every sequence); groups: for the padded
    backend, attention blocks ``(start, stop, rows, width, prefix_start, prefix_len)`` of contiguous
    segments of similar length (``prefix_len`` > 0: remainders of one group, attending to that prefix).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    num_tokens: int
    backend: str
    groups: list[tuple[int, int, int, int, int, int]]
    parent: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.last.shape[0])

    @property
    def shared(self) -> bool:
        return self.parent is not None and bool((self.parent >= 0).any())

    def inputs(self, device: torch.device | str) -> dict:
        """Keyword arguments of the decoder's forward for this pack on ``device``: ids, positions and
        what the attention backend needs (no host synchronisation: everything is built on the host)."""
        dev = torch.device(device)
        kw = {"input_ids": to_device(self.input_ids, dev), "position_ids": to_device(self.position_ids, dev)}
        cu = to_device(self.cu_seqlens, dev)
        if self.backend in ("flash", "varlen"):
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_len, max_length_k=self.max_len)
            if self.shared:  # each segment's keys: its prefix's, then its own
                cu_np = self.cu_seqlens.numpy().astype(np.int64)
                ranges = [(int(cu_np[p]), int(cu_np[p + 1])) if p >= 0 else (0, 0) for p in self.parent.tolist()]
                index = np.concatenate([np.r_[a:b, cu_np[k]:cu_np[k + 1]] for k, (a, b) in enumerate(ranges)])
                lengths = np.diff(cu_np) + np.array([b - a for a, b in ranges], dtype=np.int64)
                cu_k = np.zeros(len(lengths) + 1, dtype=np.int64)
                np.cumsum(lengths, out=cu_k[1:])
                kw.update(cu_seq_lens_k=to_device(torch.from_numpy(cu_k).to(torch.int32), dev),
                          max_length_k=int(lengths.max()),
                          packed_kv_index=to_device(torch.from_numpy(index.astype(np.int64)), dev))
        elif self.backend == "flex":
            kw["block_mask"] = block_mask(self.cu_seqlens, int(self.input_ids.shape[1]), dev, self.parent)
        else:  # padded: each token's place (row * width + position) in its group's block
            index = np.empty(int(self.input_ids.shape[1]), dtype=np.int64)
            cu_np = self.cu_seqlens.numpy().astype(np.int64)
            seg = 0
            for start, stop, rows, width, _, _ in self.groups:
                lengths = np.diff(cu_np[seg:seg + rows + 1])
                local = np.repeat(np.arange(rows), lengths)
                index[start:stop] = local * width + (np.arange(stop - start) - np.repeat(cu_np[seg:seg + rows] - start,
                                                                                        lengths))
                seg += rows
            kw.update(packed_index=to_device(torch.from_numpy(index), dev), packed_groups=self.groups)
        return kw


def pack(seqs: Sequence[Sequence[int]], pad_id: int, backend: str = "padded", multiple: int = 1,
         grouped: bool = True, share: int = 0, shared: list[tuple[int, list[int]]] | None = None) -> Pack:
    """Concatenate token id lists into one row, longest first (see the module docstring); ``multiple``
    rounds the row's length up with filler segments no longer than the longest sequence. ``grouped``
    (padded backend): one attention block per run of similar lengths, else a single block (one
    shape for compiled graphs). ``share`` > 0: sequences beginning with the same ``share`` or more
    tokens run that prefix once (``share_groups``, or the groups given as ``shared``; backends in
    ``SHARING_BACKENDS``, padded only grouped)."""
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) < 1:
        raise ValueError("pack() needs at least one sequence and no empty sequence")
    if share and (backend not in SHARING_BACKENDS or (backend == "padded" and not grouped)):
        raise ValueError(f"shared prefixes need the padded (grouped), flex or varlen backend, got {backend!r}")
    if shared is None:
        shared = share_groups(seqs, share) if share else []
    in_group = {i for _, members in shared for i in members}
    # free segments: (length, input index (-1 filler, -2 - g the prefix of group g), first position)
    free = [(n, i, 0) for i, n in enumerate(lengths) if i not in in_group]
    free += [(prefix, -2 - g, 0) for g, (prefix, _) in enumerate(shared)]
    rest = [sorted(((lengths[i] - prefix, i, prefix) for i in members), key=lambda x: -x[0])
            for prefix, members in shared]
    computed = sum(n for n, _, _ in free) + sum(n for group in rest for n, _, _ in group)
    longest = max(n for n, _, _ in free + [x for group in rest for x in group])
    fill = (-computed) % multiple if multiple > 1 else 0
    while fill:  # filler segments (pad tokens, never read) so T is a multiple of `multiple`
        free.append((min(fill, longest), -1, 0))
        fill -= free[-1][0]
    free.sort(key=lambda p: -p[0])  # stable: equal lengths keep their input order
    parts = free + [x for group in rest for x in group]
    segments = np.asarray([n for n, _, _ in parts], dtype=np.int64)
    cu = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(segments, out=cu[1:])
    width = int(cu[-1])
    prefix_seg = {-2 - i: k for k, (_, i, _) in enumerate(free) if i <= -2}  # group -> its prefix segment

    def tokens(n, i, first):
        if i == -1:
            return [pad_id] * n
        if i <= -2:
            prefix, members = shared[-2 - i]
            return seqs[members[0]][:prefix]
        return seqs[i][first:]

    flat = np.fromiter((t for n, i, first in parts for t in tokens(n, i, first)), dtype=np.int64, count=width)
    positions = np.arange(width, dtype=np.int64) - np.repeat(cu[:-1], segments)
    positions += np.repeat(np.asarray([first for _, _, first in parts], dtype=np.int64), segments)
    last = np.empty(len(lengths), dtype=np.int64)
    for k, (_, i, _) in enumerate(parts):
        if i >= 0:
            last[i] = cu[k + 1] - 1
    parent = np.full(len(parts), -1, dtype=np.int64)
    k = len(free)
    for g, group in enumerate(rest):
        parent[k:k + len(group)] = prefix_seg[g]
        k += len(group)

    def runs(first: int, stop: int, pstart: int = 0, plen: int = 0) -> list[tuple[int, int, int, int, int, int]]:
        out = []
        for k in range(first + 1, stop + 1):
            if k == stop or segments[k] < GROUP_RATIO * segments[first]:
                out.append((int(cu[first]), int(cu[k]), k - first, int(segments[first]), pstart, plen))
                first = k
        return out

    if backend == "padded" and grouped:
        groups, k = runs(0, len(free)), len(free)
        for g, group in enumerate(rest):
            groups += runs(k, k + len(group), int(cu[prefix_seg[g]]), shared[g][0])
            k += len(group)
    else:
        groups = [(0, width, len(parts), longest, 0, 0)]
    return Pack(input_ids=torch.from_numpy(flat)[None], position_ids=torch.from_numpy(positions)[None],
                last=torch.from_numpy(last), cu_seqlens=torch.from_numpy(cu).to(torch.int32), max_len=longest,
                num_tokens=sum(lengths), backend=backend, groups=groups,
                parent=torch.from_numpy(parent) if shared else None)


@dataclass
class Packed:
    """``n`` sequences in one or more packed rows (``pack_rows``): what a forward receives.

    ``order[i]``: where input sequence ``i``'s result sits in the concatenation of the rows' results."""

    rows: list[Pack]
    order: torch.Tensor

    def __len__(self) -> int:
        return int(self.order.shape[0])

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    def inputs(self, device: torch.device | str) -> dict:
        """``forward(**packed.inputs(device))`` keyword arguments of an Embedder or Reranker."""
        dev = torch.device(device)
        return {"packed": [r.inputs(dev) for r in self.rows], "last": [to_device(r.last, dev) for r in self.rows],
                "order": to_device(self.order, dev) if len(self.rows) > 1 else None}


def pack_rows(seqs: Sequence[Sequence[int]], pad_id: int, backend: str = "padded", multiple: int = 1,
              grouped: bool = True, max_tokens: int | None = None, share: int = 0) -> Packed:
    """``pack`` into rows of at most ``max_tokens`` real tokens (a longer sequence alone), longest
    sequences first; None: one row. Several rows keep each forward's activations small enough to stay
    in the CPU's caches (``model.pack_tokens``); on a GPU one row is best. A shared-prefix group
    (``share``) stays in one row and counts its prefix once."""
    groups = share_groups(seqs, share) if share else []  # chosen once, for every row
    in_group = {i for _, members in groups for i in members}
    units = [(prefix + sum(len(seqs[i]) - prefix for i in members), members) for prefix, members in groups]
    units += [(len(seqs[i]), [i]) for i in range(len(seqs)) if i not in in_group]  # (tokens computed, members)
    if not max_tokens or sum(c for c, _ in units) <= max_tokens:
        return Packed([pack(seqs, pad_id, backend, multiple, grouped, share, groups)], torch.arange(len(seqs)))
    rows, cur, used = [], [], 0
    for cost, members in sorted(units, key=lambda u: -u[0]):
        if cur and used + cost > max_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur += members
        used += cost
    rows.append(cur)
    order = torch.empty(len(seqs), dtype=torch.long)
    order[torch.tensor([i for r in rows for i in r])] = torch.arange(len(seqs))
    packs = []
    for r in rows:  # each row's groups in its own indices
        local = {i: k for k, i in enumerate(r)}
        row_groups = [(prefix, [local[i] for i in members]) for prefix, members in groups if members[0] in local]
        packs.append(pack([seqs[i] for i in r], pad_id, backend, multiple, grouped, share, row_groups))
    return Packed(packs, order)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """A padded batch (either side) back to its token id lists: what a packed model does with one."""
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]


def block_mask(cu_seqlens: torch.Tensor, width: int, device: torch.device, parent: torch.Tensor | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.diff(cu_seqlens.long())
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    if parent is not None:
        up = parent.to(device)

        def causal_or_prefix(b, h, q, k):  # its own tokens causally, all of its shared prefix
            return ((doc[q] == doc[k]) & (q >= k)) | (up[doc[q]] == doc[k])

        mask_mod = causal_or_prefix
    else:
        def same_sequence_causal(b, h, q, k):
            return (doc[q] == doc[k]) & (q >= k)

        mask_mod = same_sequence_causal
    # compiled on CUDA: the eager construction evaluates every (query, key) pair, T^2 of them
    return create_block_mask(mask_mod, None, None, width, width, device=device, _compile=device.type == "cuda")
