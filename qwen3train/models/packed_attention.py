"""Attention over packed rows (``qwen3train.models.packing``): the functions registered with transformers'
AttentionInterface for the ``padded``, ``flex`` and ``varlen`` backends, the choice of backend
(``model.packed_attention``) and the start-up checks that decide what a GPU's kernels may do (torch's varlen
attention at all, and with shared prefixes)."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F

from qwen3train.models.packing import pack

logger = logging.getLogger(__name__)

PACKED_ATTENTION = ("auto", "flash", "varlen", "flex", "padded")
# our attention functions, registered with transformers' AttentionInterface under these names
_REGISTERED = {"varlen": "qwen3train_varlen", "flex": "qwen3train_flex", "padded": "qwen3train_padded"}


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
    half = (torch.float16, torch.bfloat16)
    if not all(x.dtype in half for x in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) > 1:
        # FlashAttention takes one half dtype; under autocast with fp32 master weights the q/k norms hand
        # fp32 over (fp32 weight x bf16 activation), which SDPA would have cast to the autocast dtype
        if torch.is_autocast_enabled(q.device.type):
            dt = torch.get_autocast_dtype(q.device.type)
        else:
            dt = next((x.dtype for x in (q, k, v) if x.dtype in half), None)
            if dt is None:
                raise RuntimeError("the varlen packed attention needs bf16/fp16 compute (resolve_backend picks "
                                   "flex for fp32)")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
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


def resolve_backend(name: str, device_type: str, training: bool = False, half: bool = True) -> str:
    """The packed attention backend to use (``model.packed_attention``); ``auto`` as the module says.
    ``half``: the attention computes in bf16/fp16 (bf16 autocast, or half weights for inference); the
    FlashAttention kernels (``flash``, ``varlen``) take nothing else, so fp32 compute gets FlexAttention."""
    from qwen3train.errors import ConfigError

    if name not in PACKED_ATTENTION:
        raise ConfigError(f"model.packed_attention must be one of {PACKED_ATTENTION}, got {name!r}")
    cuda = device_type == "cuda"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        if not cuda:
            return "padded"
        if not half:
            logger.info("packed attention: fp32 compute, which FlashAttention kernels do not take; using FlexAttention")
            return "flex"
        if has_flash:
            return "flash"
        why = _varlen_works(torch.cuda.current_device())
        if why is None:
            return "varlen"
        logger.info("packed attention: torch varlen unavailable (%s); using FlexAttention", why)
        return "flex"
    if name in ("flash", "varlen") and not half:
        raise ConfigError(f"model.packed_attention={name} needs bf16/fp16 compute (engine.precision=bf16, or "
                          "model.dtype=bfloat16 for inference); use flex or auto with fp32")
    if name == "flash" and not (cuda and has_flash):
        raise ConfigError("model.packed_attention=flash needs the flash-attn package and a CUDA GPU")
    if name == "varlen" and not cuda:
        raise ConfigError("model.packed_attention=varlen needs a CUDA GPU (torch's varlen FlashAttention)")
    if name == "flex" and training and not cuda:
        raise ConfigError("model.packed_attention=flex cannot train on the CPU (FlexAttention has no CPU "
                          "backward); use padded or auto")
    return name
