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


@dataclass
class Pack:
    """``n`` token sequences as one row. Tensors are on the CPU until ``inputs(device)``.

    The row holds the sequences longest first (then the filler segments); ``last[i]`` is where input
    sequence ``i`` ends, so callers read results in their own order. input_ids / position_ids:
    ``[1, T]``; last: ``[n]``; cu_seqlens: ``[s + 1]`` int32 boundaries of every segment; max_len: the
    longest segment; num_tokens: real tokens (``sum(lengths)``); groups: for the padded backend, runs of
    segments of similar length ``(start, stop, rows, width)``, each one attention block.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    last: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    num_tokens: int
    backend: str
    groups: list[tuple[int, int, int, int]]

    def __len__(self) -> int:
        return int(self.last.shape[0])

    def inputs(self, device: torch.device | str) -> dict:
        """Keyword arguments of the decoder's forward for this pack on ``device``: ids, positions and
        what the attention backend needs (no host synchronisation: everything is built on the host)."""
        dev = torch.device(device)
        kw = {"input_ids": self.input_ids.to(dev, non_blocking=True),
              "position_ids": self.position_ids.to(dev, non_blocking=True)}
        cu = self.cu_seqlens.to(dev, non_blocking=True)
        if self.backend in ("flash", "varlen"):
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_len, max_length_k=self.max_len)
        elif self.backend == "flex":
            kw["block_mask"] = _block_mask(self.cu_seqlens, int(self.input_ids.shape[1]), dev)
        else:  # padded: each token's place (row * width + position) in its group's block
            index = np.empty(int(self.input_ids.shape[1]), dtype=np.int64)
            cu_np = self.cu_seqlens.numpy().astype(np.int64)
            seg = 0
            for start, stop, rows, width in self.groups:
                lengths = np.diff(cu_np[seg:seg + rows + 1])
                local = np.repeat(np.arange(rows), lengths)
                index[start:stop] = local * width + (np.arange(stop - start) - np.repeat(cu_np[seg:seg + rows] - start,
                                                                                        lengths))
                seg += rows
            kw.update(packed_index=torch.from_numpy(index).to(dev, non_blocking=True), packed_groups=self.groups)
        return kw


def pack(seqs: Sequence[Sequence[int]], pad_id: int, backend: str = "padded", multiple: int = 1,
         grouped: bool = True) -> Pack:
    """Concatenate token id lists into one row, longest first (see the module docstring); ``multiple``
    rounds the row's length up with filler segments no longer than the longest sequence. ``grouped``
    (padded backend): one attention block per run of similar lengths, else a single block (one
    shape for compiled graphs)."""
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) < 1:
        raise ValueError("pack() needs at least one sequence and no empty sequence")
    total, max_len = sum(lengths), max(lengths)
    parts = [(n, i) for i, n in enumerate(lengths)]  # (length, input index; -1 = filler)
    fill = (-total) % multiple if multiple > 1 else 0
    while fill:  # filler segments (pad tokens, never read) so T is a multiple of `multiple`
        parts.append((min(fill, max_len), -1))
        fill -= parts[-1][0]
    parts.sort(key=lambda p: -p[0])  # stable: equal lengths keep their input order
    segments = [n for n, _ in parts]
    flat = np.fromiter((t for n, i in parts for t in (seqs[i] if i >= 0 else [pad_id] * n)), dtype=np.int64,
                       count=sum(segments))
    width = len(flat)
    seg_lengths = np.asarray(segments, dtype=np.int64)
    cu = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(seg_lengths, out=cu[1:])
    positions = np.arange(width, dtype=np.int64) - np.repeat(cu[:-1], seg_lengths)
    last = np.empty(len(lengths), dtype=np.int64)
    for k, (_, i) in enumerate(parts):
        if i >= 0:
            last[i] = cu[k + 1] - 1
    groups = [(0, width, len(segments), max_len)]
    if grouped and backend == "padded":
        groups, first = [], 0
        for k in range(1, len(segments) + 1):
            if k == len(segments) or segments[k] < GROUP_RATIO * segments[first]:
                groups.append((int(cu[first]), int(cu[k]), k - first, int(segments[first])))
                first = k
    return Pack(input_ids=torch.from_numpy(flat)[None], position_ids=torch.from_numpy(positions)[None],
                last=torch.from_numpy(last), cu_seqlens=torch.from_numpy(cu).to(torch.int32), max_len=max_len,
                num_tokens=total, backend=backend, groups=groups)


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
              grouped: bool = True, max_tokens: int | None = None) -> Packed:
    """``pack`` into rows of at most ``max_tokens`` real tokens (a longer sequence alone), longest
    sequences first; None: one row. Several rows keep each forward's activations small enough to stay
    in the CPU's caches (``model.pack_tokens``); on a GPU one row is best."""
    total = sum(len(s) for s in seqs)
    if not max_tokens or total <= max_tokens:
        return Packed([pack(seqs, pad_id, backend, multiple, grouped)], torch.arange(len(seqs)))
    by_length = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows, cur, used = [], [], 0
    for i in by_length:
        if cur and used + len(seqs[i]) > max_tokens:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(seqs[i])
    rows.append(cur)
    order = torch.empty(len(seqs), dtype=torch.long)
    order[torch.tensor(by_length)] = torch.arange(len(seqs))
    return Packed([pack([seqs[i] for i in r], pad_id, backend, multiple, grouped) for r in rows], order)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """A padded batch (either side) back to its token id lists: what a packed model does with one."""
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu())]


def _block_mask(cu_seqlens: torch.Tensor, width: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.diff(cu_seqlens.long())
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)

    def same_sequence_causal(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k)

    # compiled on CUDA: the eager construction evaluates every (query, key) pair, T^2 of them
    return create_block_mask(same_sequence_causal, None, None, width, width, device=device,
                             _compile=device.type == "cuda")


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
    for start, stop, rows, width in packed_groups:
        idx = packed_index[start:stop]

        def block(x):  # the group's tokens [t, h, d] -> [rows, h, width, d], zeros past each row's end
            buf = x.new_zeros(rows * width, x.shape[1], d).index_copy(0, idx, x[start:stop])
            return buf.view(rows, width, x.shape[1], d).transpose(1, 2)

        out = _sdpa_causal(block(q), block(k), block(v), scaling, dropout)
        outs.append(out.transpose(1, 2).reshape(rows * width, q.shape[1], d).index_select(0, idx))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0), None


CPU_MATH_WIDTH = 64  # on the CPU, blocks up to this width run SDPA's math kernel (measured: 5x faster there)


def _sdpa_causal(q, k, v, scaling, dropout):
    """Causal SDPA over right-padded blocks. On the CPU the flash kernel's fixed blocking makes short
    rows slow (a [32, 9, 24, 64] bf16 block: 12.5 ms forward + backward vs 2.3 ms with the math kernel),
    and its bf16 path is slower than its fp32 one (58 vs 39 ms at [32, 9, 128, 64]): short blocks take
    the math kernel, longer ones the flash kernel in fp32 (results cast back)."""
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.shape[2] <= CPU_MATH_WIDTH:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout,
                                                  enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scaling,
                                         dropout_p=dropout, enable_gqa=gqa)
    return out.to(q.dtype)


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
                            cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """torch's varlen FlashAttention on ``[T, H, d]``. Its keywords changed between torch releases
    (2.10 ``is_causal``; later ``window_size`` and ``scale``; ``enable_gqa`` from 2.12): the ones
    this torch accepts are used, and grouped key/value heads are repeated where it lacks GQA."""
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None:
        raise RuntimeError("qwen3train's packed attention was called without a pack (use Embedder/Reranker)")
    params = _varlen_signature()
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, h, d]
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
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **kw)
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
                               packed_groups=[(0, 8, 2, 5)])[0]
        out.float().sum().backward()
        if (out.float() - ref.float()).abs().max() > 2e-2:
            return "its output differs from the exact path"
    except Exception as e:  # noqa: BLE001 - any failure means: use another backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
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
