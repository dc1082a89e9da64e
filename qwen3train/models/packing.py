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

The pooled vector (embedder) or the yes/no logits (reranker) are read at each sequence's own last
token (``Pack.last``), never padded back. ``pack_multiple`` > 1 rounds ``T`` up with filler
sequences (pad tokens in segments of their own, never read) so that compiled graphs and CUDA graphs
see a few shapes only.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PACKED_ATTENTION = ("auto", "flash", "varlen", "flex", "padded")
# our attention functions, registered with transformers' AttentionInterface under these names
_REGISTERED = {"varlen": "qwen3train_varlen", "flex": "qwen3train_flex", "padded": "qwen3train_padded"}


GROUP_RATIO = 0.75  # padded backend: a new attention block starts when a sequence is < 75% of the block's longest
SHARE_WINDOW = 256  # shared-prefix groups hold at most this many sequences (bounds the partition's cost)
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
    best = [0] * (n + 1)  # most tokens saved by the first i sequences of the order
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last group, its prefix; 0 = alone)
    for i in range(1, n + 1):
        best[i], cut[i] = best[i - 1], (i - 1, 0)
        common, shortest = None, len(seqs[order[i - 1]])
        for j in range(i - 2, max(-1, i - 1 - SHARE_WINDOW), -1):  # the group order[j:i]
            common = adj[j] if common is None else min(common, adj[j])
            shortest = min(shortest, len(seqs[order[j]]))
            prefix = min(common, shortest - 1)
            if prefix < min_len:
                break  # only falls as j moves down
            if best[j] + (i - j - 1) * prefix > best[i]:
                best[i], cut[i] = best[j] + (i - j - 1) * prefix, (j, prefix)
    groups, i = [], n
    while i > 0:
        j, prefix = cut[i]
        if prefix:
            groups.append((prefix, sorted(order[j:i])))
        i = j
    return groups[::-1]


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
        kw = {"input_ids": self.input_ids.to(dev, non_blocking=True),
              "position_ids": self.position_ids.to(dev, non_blocking=True)}
        cu = self.cu_seqlens.to(dev, non_blocking=True)
        if self.backend in ("flash", "varlen"):
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_len, max_length_k=self.max_len)
            if self.shared:  # each segment's keys: its prefix's, then its own
                cu_np = self.cu_seqlens.numpy().astype(np.int64)
                ranges = [(int(cu_np[p]), int(cu_np[p + 1])) if p >= 0 else (0, 0) for p in self.parent.tolist()]
                index = np.concatenate([np.r_[a:b, cu_np[k]:cu_np[k + 1]] for k, (a, b) in enumerate(ranges)])
                lengths = np.diff(cu_np) + np.array([b - a for a, b in ranges], dtype=np.int64)
                cu_k = np.zeros(len(lengths) + 1, dtype=np.int64)
                np.cumsum(lengths, out=cu_k[1:])
                kw.update(cu_seq_lens_k=torch.from_numpy(cu_k).to(torch.int32).to(dev, non_blocking=True),
                          max_length_k=int(lengths.max()),
                          packed_kv_index=torch.from_numpy(index.astype(np.int64)).to(dev, non_blocking=True))
        elif self.backend == "flex":
            kw["block_mask"] = _block_mask(self.cu_seqlens, int(self.input_ids.shape[1]), dev, self.parent)
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
            kw.update(packed_index=torch.from_numpy(index).to(dev, non_blocking=True), packed_groups=self.groups)
        return kw


def pack(seqs: Sequence[Sequence[int]], pad_id: int, backend: str = "padded", multiple: int = 1,
         grouped: bool = True, share: int = 0) -> Pack:
    """Concatenate token id lists into one row, longest first (see the module docstring); ``multiple``
    rounds the row's length up with filler segments no longer than the longest sequence. ``grouped``
    (padded backend): one attention block per run of similar lengths, else a single block (one
    shape for compiled graphs). ``share`` > 0: sequences beginning with the same ``share`` or more
    tokens run that prefix once (``share_groups``; backends in ``SHARING_BACKENDS``, padded only grouped)."""
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) < 1:
        raise ValueError("pack() needs at least one sequence and no empty sequence")
    if share and (backend not in SHARING_BACKENDS or (backend == "padded" and not grouped)):
        raise ValueError(f"shared prefixes need the padded (grouped), flex or varlen backend, got {backend!r}")
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
        return {"packed": [r.inputs(dev) for r in self.rows], "last": [r.last.to(dev, non_blocking=True) for r in self.rows],
                "order": self.order.to(dev, non_blocking=True) if len(self.rows) > 1 else None}


def pack_rows(seqs: Sequence[Sequence[int]], pad_id: int, backend: str = "padded", multiple: int = 1,
              grouped: bool = True, max_tokens: int | None = None, share: int = 0) -> Packed:
    """``pack`` into rows of at most ``max_tokens`` real tokens (a longer sequence alone), longest
    sequences first; None: one row. Several rows keep each forward's activations small enough to stay
    in the CPU's caches (``model.pack_tokens``); on a GPU one row is best. A shared-prefix group
    (``share``) stays in one row and counts its prefix once."""
    units = [[i] for i in range(len(seqs))]
    cost = [len(s) for s in seqs]
    if share:
        grouped_ids = set()
        units, cost = [], []
        for prefix, members in share_groups(seqs, share):
            units.append(members)
            cost.append(prefix + sum(len(seqs[i]) - prefix for i in members))
            grouped_ids.update(members)
        for i in range(len(seqs)):
            if i not in grouped_ids:
                units.append([i])
                cost.append(len(seqs[i]))
    if not max_tokens or sum(cost) <= max_tokens:
        return Packed([pack(seqs, pad_id, backend, multiple, grouped, share)], torch.arange(len(seqs)))
    by_cost = sorted(range(len(units)), key=lambda u: -cost[u])
    rows, cur, used = [], [], 0
    for u in by_cost:
        if cur and used + cost[u] > max_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur += units[u]
        used += cost[u]
    rows.append(cur)
    flat = [i for r in rows for i in r]
    order = torch.empty(len(seqs), dtype=torch.long)
    order[torch.tensor(flat)] = torch.arange(len(seqs))
    return Packed([pack([seqs[i] for i in r], pad_id, backend, multiple, grouped, share) for r in rows], order)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """A padded batch (either side) back to its token id lists: what a packed model does with one."""
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]


def _block_mask(cu_seqlens: torch.Tensor, width: int, device: torch.device, parent: torch.Tensor | None = None):
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


# ---- attention functions (transformers' AttentionInterface signature) ---------------------------

def padded_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_index=None, packed_groups=None, **kwargs):
    """query ``[1, Hq, T, d]``, key/value ``[1, Hkv, T, d]`` -> ``[1, T, Hq, d]``: exact, any device.

    Each group of similar-length segments (contiguous in the row) is scattered into a right-padded
    ``[rows, h, width, d]`` block and run through SDPA with the causal flag."""
    if packed_index is None:
        raise RuntimeError("qwen3train's packed attention was called without a pack (use Embedder/Reranker)")
    d = query.shape[-1]
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, h, d]
    outs = []
    for start, stop, rows, width, pstart, plen in packed_groups:
        idx = packed_index[start:stop]

        def block(x):  # the group's tokens [t, h, d] -> [rows, h, width, d], zeros past each row's end
            buf = x.new_zeros(rows * width, x.shape[1], d).index_copy(0, idx, x[start:stop])
            return buf.view(rows, width, x.shape[1], d).transpose(1, 2)

        if plen:  # remainders of a shared prefix: its keys and values first, in every row
            def with_prefix(x):
                head = x[pstart:pstart + plen].transpose(0, 1).unsqueeze(0).expand(rows, -1, -1, -1)
                return torch.cat([head, block(x)], dim=2)

            out = _sdpa_causal(block(q), with_prefix(k), with_prefix(v), scaling, dropout, offset=plen)
        else:
            out = _sdpa_causal(block(q), block(k), block(v), scaling, dropout)
        outs.append(out.transpose(1, 2).reshape(rows * width, q.shape[1], d).index_select(0, idx))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0), None


CPU_MATH_WIDTH = 64  # on the CPU, blocks up to this width run SDPA's math kernel (measured: 5x faster there)


def _sdpa_causal(q, k, v, scaling, dropout, offset: int = 0):
    """Causal SDPA over right-padded blocks; ``offset`` leading keys (a shared prefix) are seen by every
    query. On the CPU the flash kernel's fixed blocking makes short rows slow (a [32, 9, 24, 64] bf16
    block: 12.5 ms forward + backward vs 2.3 ms with the math kernel), and its bf16 path is slower than
    its fp32 one (58 vs 39 ms at [32, 9, 128, 64]): short blocks take the math kernel, longer ones the
    flash kernel in fp32 (results cast back)."""
    gqa = q.shape[1] != k.shape[1]
    kw = dict(scale=scaling, dropout_p=dropout, enable_gqa=gqa)
    if offset:  # query i sees keys 0 .. offset + i
        kw["attn_mask"] = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(offset)
    else:
        kw["is_causal"] = True
    if q.is_cuda or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if k.shape[2] <= CPU_MATH_WIDTH:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)


_compiled_flex = None


def flex_packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          block_mask=None, **kwargs):
    """FlexAttention over the packed row with a same-sequence causal block mask."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if block_mask is None:
        raise RuntimeError("qwen3train's packed attention was called without a pack (use Embedder/Reranker)")
    fn = flex_attention
    if query.is_cuda and not torch.compiler.is_compiling():  # eager flex materialises scores: compile it
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        fn = _compiled_flex
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


@functools.lru_cache(maxsize=1)
def _varlen_signature() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            cu_seq_lens_q=None, max_length_q=None, cu_seq_lens_k=None, max_length_k=None,
                            packed_kv_index=None, **kwargs):
    """torch's varlen FlashAttention on ``[T, H, d]``. Its keywords changed between torch releases
    (2.10 ``is_causal``; later ``window_size`` and ``scale``; ``enable_gqa`` from 2.12): the ones
    this torch accepts are used, and grouped key/value heads are repeated where it lacks GQA."""
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None:
        raise RuntimeError("qwen3train's packed attention was called without a pack (use Embedder/Reranker)")
    params = _varlen_signature()
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, h, d]
    if packed_kv_index is not None:  # shared prefixes: each segment's keys are its prefix's, then its own
        k, v = k.index_select(0, packed_kv_index), v.index_select(0, packed_kv_index)
    else:
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
    else:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scaling
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **kw)
    return out.unsqueeze(0), None


_FUNCTIONS = {"varlen": varlen_packed_attention, "flex": flex_packed_attention, "padded": padded_attention}


def register() -> None:
    """Make our attention functions known to transformers (idempotent; called by the model builders,
    never at import)."""
    from transformers import AttentionInterface

    for backend, name in _REGISTERED.items():
        AttentionInterface.register(name, _FUNCTIONS[backend])


def attn_implementation(backend: str) -> str:
    """The ``attn_implementation`` a backbone is loaded with for a packed backend."""
    return "flash_attention_2" if backend == "flash" else _REGISTERED[backend]


@functools.lru_cache(maxsize=None)
def _varlen_works(device_index: int) -> str | None:
    """None if torch's varlen attention runs forward and backward here, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.varlen"
    try:
        dev = torch.device("cuda", device_index)
        q = torch.randn(1, 4, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(1, 2, 8, 64, device=dev, dtype=torch.bfloat16)
        cu = torch.tensor([0, 3, 8], device=dev, dtype=torch.int32)
        out, _ = varlen_packed_attention(None, q, kv, kv, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=5)
        ref = padded_attention(None, q, kv, kv, None, scaling=0.125,
                               packed_index=torch.tensor([0, 1, 2, 5, 6, 7, 8, 9], device=dev),
                               packed_groups=[(0, 8, 2, 5, 0, 0)])[0]
        out.float().sum().backward()
        if (out.float() - ref.float()).abs().max() > 2e-2:
            return "its output differs from the exact path"
    except Exception as e:  # noqa: BLE001 - any failure means: use another backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def agrees_with_exact(backend: str, device: torch.device | str, dtype=torch.bfloat16) -> str | None:
    """None if ``backend`` gives the exact (padded) path's attention output, forward and backward, on a
    pack with shared prefixes (two groups, one sequence alone, unequal lengths) on ``device``; else why not.
    What decides whether shared prefixes are used with the varlen backend (``sharing``)."""
    try:
        seqs = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9], [1, 2, 3, 4, 8], [5, 5, 5, 5], [7, 7, 7, 6, 6, 6, 6, 6],
                [7, 7, 7, 6, 1]]
        got_pack, ref_pack = pack(seqs, 0, backend, share=3), pack(seqs, 0, "padded", share=3)
        t = int(got_pack.input_ids.shape[1])
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, t, 64, generator=gen).to(device, dtype).requires_grad_(torch.device(device).type == "cuda")
        kv = torch.randn(1, 2, t, 64, generator=gen).to(device, dtype)
        fn = {"varlen": varlen_packed_attention, "flex": flex_packed_attention}[backend]
        kw = {k: v for k, v in got_pack.inputs(device).items() if k not in ("input_ids", "position_ids")}
        out = fn(None, q, kv, kv, None, scaling=0.125, **kw)[0]
        kw = {k: v for k, v in ref_pack.inputs(device).items() if k not in ("input_ids", "position_ids")}
        ref = padded_attention(None, q, kv, kv, None, scaling=0.125, **kw)[0]
        if (out.float() - ref.float()).abs().max() > 2e-2:
            return "its output with shared prefixes differs from the exact path"
        if q.requires_grad:
            out.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: do not share prefixes with it
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@functools.lru_cache(maxsize=None)
def sharing(backend: str, device_type: str, compiled: bool) -> str | None:
    """None if shared prefixes can be used with this backend here, else why not (logged by the caller)."""
    if backend == "flash":
        return "transformers' flash_attention_2 takes one set of sequence boundaries for queries and keys"
    if backend == "padded" and compiled:
        return "the padded backend runs one block when compiled"
    if backend == "varlen":
        return agrees_with_exact("varlen", torch.device("cuda", torch.cuda.current_device()))
    return None


def resolve_backend(name: str, device_type: str, training: bool = False) -> str:
    """The packed attention backend to use (``model.packed_attention``); ``auto`` as the module says."""
    from qwen3train.errors import ConfigError

    if name not in PACKED_ATTENTION:
        raise ConfigError(f"model.packed_attention must be one of {PACKED_ATTENTION}, got {name!r}")
    cuda = device_type == "cuda"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        if not cuda:
            return "padded"
        if has_flash:
            return "flash"
        why = _varlen_works(torch.cuda.current_device())
        if why is None:
            return "varlen"
        logger.info("packed attention: torch varlen unavailable (%s); using FlexAttention", why)
        return "flex"
    if name == "flash" and not (cuda and has_flash):
        raise ConfigError("model.packed_attention=flash needs the flash-attn package and a CUDA GPU")
    if name == "varlen" and not cuda:
        raise ConfigError("model.packed_attention=varlen needs a CUDA GPU (torch's varlen FlashAttention)")
    if name == "flex" and training and not cuda:
        raise ConfigError("model.packed_attention=flex cannot train on the CPU (FlexAttention has no CPU "
                          "backward); use padded or auto")
    return name
