"""ModelConfig and the builders that turn it into an Embedder or a Reranker (plain arguments below)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from qwen3train.errors import ConfigError, at_least
from qwen3train.models.card import read_meta
from qwen3train.text import DEFAULT_INSTRUCTION, DEFAULT_QUERY_TEMPLATE

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraConfig:
    """LoRA through peft. The paper's blog says LoRA; rank/alpha/targets are UNCONFIRMED (spec §1.1)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        at_least("model.lora", r=(self.r, 1))
        if self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.alpha must be > 0 and model.lora.dropout in [0, 1); got {self.alpha}, "
                             f"{self.dropout}")


@dataclass
class ModelConfig:
    """Which checkpoint to load and how inputs are formatted.

    ``init_from``, when set, overrides ``name_or_path`` for the weights (stage 2 starts from stage 1's
    export) while the tokenizer and the rest stay as configured.
    """

    name: str = "tiny"
    name_or_path: str = "outputs/models/tiny-qwen3"
    init_from: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Query format: the official inference string; the exact training string is UNCONFIRMED (spec §1.2).
    query_template: str = DEFAULT_QUERY_TEMPLATE
    default_instruction: str = DEFAULT_INSTRUCTION
    # The token appended to every input. null: the one a qwen3train export records, else the rule in
    # qwen3train.text.resolve_end_token (the family's end-of-text token, else eos_token).
    end_token: str | None = None
    max_query_length: int = 512
    max_doc_length: int = 512
    # Right padding in training (spec §1.4 RECOMMENDATION); pooling reads the mask, so left works too.
    padding_side: str = "right"
    # Padding-free forward (qwen3train/models/packing.py): a micro-batch's sequences run as one row,
    # attention kept inside each sequence; training, evaluation, filtering, mining and personas alike.
    # false = padded batches (the length_buckets below apply then).
    packing: bool = True
    # How attention stays inside each packed sequence: auto | flash (flash-attn, CUDA) | varlen (torch's
    # varlen FlashAttention, CUDA) | flex (FlexAttention block mask; CUDA for training) | padded (exact
    # on any device: SDPA over a padded block inside attention only). auto: flash where flash-attn is
    # installed, else varlen where this torch runs it, else flex, on CUDA; padded on the CPU.
    packed_attention: str = "auto"
    # Packed rows are rounded up to a multiple of this many tokens with filler segments (never read),
    # so compiled graphs and CUDA graphs see few shapes. null = auto: 256 under CUDA graphs
    # (compile_mode reduce-overhead), else 1 (dynamic-shape compilation needs none).
    pack_multiple: int | None = None
    # Real tokens per packed row: a forward runs its rows one after another (one backward for all).
    # null = auto: 2048 on the CPU, where a row's activations then stay in cache (measured: bench/bench_packing.py),
    # unbounded on CUDA, where one long row keeps the kernels large. 0 = one row always.
    pack_tokens: int | None = None
    # Shared prefixes in packed rows: sequences of a micro-batch that begin with at least this many equal
    # tokens run them once (the reranker's prompt + instruction + query before each of a query's documents;
    # an embedder's instruction before its queries); same results to rounding (qwen3train/models/packing.py).
    # null = auto: 16 where the backend shares (padded, flex, varlen when its start-up check passes); 0 = off.
    share_prefix: int | None = None
    # Padded mode: rows sorted by length and run in up to this many groups, each cut to its
    # longest row (1 = one padded batch). Same results, fewer padded tokens. null = auto: 4 on the
    # CPU (compute-bound: 2.0x faster SmolLM2 steps), 1 on CUDA, where a 0.6B model's step is bound by kernel
    # launches and each group adds a forward and a backward (measured, docs/benchmarks.md).
    length_buckets: int | None = None
    # torch.compile each decoder layer for training (regional compilation, dynamic shapes: one graph for
    # every packed length, no recompilation after warm-up): fuses the elementwise work (norms, rotary,
    # activations) that dominates small models in eager mode. null = auto: on for CUDA, off on the CPU.
    compile: bool | None = None
    # torch.compile's mode: null (default), max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs).
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"model.padding_side must be 'left' or 'right', got {self.padding_side!r}")
        from qwen3train.models.packed_attention import PACKED_ATTENTION

        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"model.packed_attention must be one of {PACKED_ATTENTION}, got {self.packed_attention!r}")
        if self.pack_tokens is not None and self.pack_tokens < 0:
            raise ValueError(f"model.pack_tokens must be >= 0, got {self.pack_tokens}")
        if self.share_prefix is not None and self.share_prefix < 0:
            raise ValueError(f"model.share_prefix must be >= 0, got {self.share_prefix}")
        if self.pack_multiple is not None and self.pack_multiple < 1:
            raise ValueError(f"model.pack_multiple must be >= 1, got {self.pack_multiple}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.length_buckets is not None and self.length_buckets < 1:
            raise ValueError(f"model.length_buckets must be >= 1, got {self.length_buckets}")
        if not self.query_template.endswith("{query}"):  # an export serves it as sentence-transformers' prompt
            raise ValueError(f"model.query_template must end with {{query}} (an export's query prompt is what comes "
                             f"before it): {self.query_template!r}")
        # a budget holds the end token and at least one token of content
        at_least("model", max_query_length=(self.max_query_length, 2), max_doc_length=(self.max_doc_length, 2))

    @property
    def weights_path(self) -> str:
        return self.init_from or self.name_or_path


def load_error(what: str, path: str, e: Exception) -> ConfigError:
    """The one line for ``what`` (a loader, vLLM's engine) failing on ``path``: "no such folder" where the name can
    only be a folder (``/``, ``.``, ``~`` first, or not ``owner/name``) and none is there, else the error's own
    first line (a hub name the hub does not know, a folder without a config)."""
    from pathlib import Path

    local = path.startswith(("/", ".", "~")) or path.count("/") != 1  # a hub name is owner/name
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = "no such folder" if local and not Path(path).expanduser().exists() else first
    return ConfigError(f"cannot load {what} from {path!r}: {where}")


def pretrained(loader, path: str, **kw):
    """``loader.from_pretrained(path)``, with a folder or hub name that cannot be loaded reported as a
    user's mistake (ConfigError, one line) rather than a traceback from deep inside transformers."""
    from qwen3train.startup import gc_paused

    try:
        with gc_paused():  # a checkpoint's, a tokenizer's many objects: no cycle collection while they load
            return loader.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise load_error(loader.__name__, path, e) from e


def load_model(loader, path: str, *, empty: bool = False, partition=None, **kw):
    """``pretrained(loader, path, **kw)``; ``empty``: the same model with its parameters on the meta device, built
    from the checkpoint's config alone (no weight is read, no memory is taken). The FSDP engine's ranks other
    than 0 build it so; rank 0 broadcasts the weights into their shards (``train/fsdp_engine.py``), and checks
    that every rank built the same parameters. Buffers (rotary frequencies) are real: the constructor computes
    them. ``partition`` (ZeRO-3 over several processes, ``train/deepspeed_engine.py Zero3Build``): every rank
    builds the model partitioned from the config, rank 0 alone loads the checkpoint and fills every rank's
    partitions from it."""
    if not empty and partition is None:
        return pretrained(loader, path, **kw)
    from transformers import AutoConfig

    from qwen3train import dist

    config = pretrained(AutoConfig, path)
    if partition is not None:
        # rank 0 reads the checkpoint in its own dtype (a bf16 release: half of float32, and no conversion); its
        # values go into the partitions in the training dtype, as a load in that dtype would convert them
        source = pretrained(loader, path, **{**kw, "dtype": "auto"}) if dist.is_main() else None
        with partition.building(kw.get("dtype") or torch.float32):
            model = loader.from_config(config, **kw)
        model.tie_weights()
        partition.fill(model, source)
        return model
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = loader.from_config(config, **kw)
    model.tie_weights()  # from_pretrained ties after loading; from_config under this context does not
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return pretrained(AutoTokenizer, path)


def resolve_attn_implementation(name: str) -> str:
    """``name`` if it can run here (``ModelConfig`` checked it is known); ``flash_attention_2``
    without the ``flash_attn`` package or without CUDA falls back to ``sdpa``, logged."""
    if name == "flash_attention_2":
        import importlib.util

        why = None
        if importlib.util.find_spec("flash_attn") is None:
            why = "the flash_attn package is not installed (pip install flash-attn)"
        elif not torch.cuda.is_available():
            why = "it needs a CUDA GPU"
        if why:
            logger.warning("model.attn_implementation=flash_attention_2 unavailable: %s; using sdpa", why)
            return "sdpa"
    return name


USE = {"embedder": "it embeds texts: give it as a model (make eval models=..., mining's or the filter's embedder)",
       "reranker": "it scores (query, document) pairs: give it as a reranker (make eval rerankers=..., "
                   "make score kind=reranker)"}


def of_its_kind(path, meta: dict, want: str, training: bool) -> None:
    """An export of the other track (its ``qwen3train.json`` says ``kind``) loads as this one all the same (the same
    backbone): evaluated, scored with or mined with, it gives numbers that mean nothing, so that is one line; a
    stage that trains from it (an embedder from a reranker's weights) may be an experiment, so it is said."""
    from qwen3train.models.card import kind_name

    kind = meta.get("kind")
    if not kind or kind == want:
        return
    if not training:
        raise ConfigError(f"{path} is {kind_name(kind)} export (its qwen3train.json), not {kind_name(want)}: "
                          f"{USE.get(kind, '')}")
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {path} is {kind_name(kind)} export: this stage trains {kind_name(want)} from its weights",
              flush=True)


def load_dtype(cfg: ModelConfig, train_precision: str | None) -> torch.dtype:
    """The dtype weights are loaded in: ``model.dtype`` for inference; float32 for training (master
    weights, see ``qwen3train.precision``), except frozen LoRA base weights under bf16 compute,
    which stay in ``model.dtype`` (they are never updated, and bf16 halves their memory)."""
    if train_precision is None:
        return DTYPES[cfg.dtype]
    if cfg.lora.enabled and train_precision == "bf16":
        return DTYPES[cfg.dtype]
    return torch.float32


def compile_enabled(cfg: ModelConfig, train_precision: str | None) -> bool:
    """``model.compile`` resolved: compiled training on CUDA unless set; inference stays eager."""
    if train_precision is None:
        return False
    return torch.cuda.is_available() if cfg.compile is None else cfg.compile


def compile_layers(model, mode: str | None = None, backend: str = "inductor") -> int:
    """Regional compilation: ``torch.compile`` on each decoder layer (one graph serves every layer:
    same code, same shapes), with dynamic shapes so packed rows of any length reuse it. Returns the
    number of layers compiled."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ConfigError(f"model.compile=true: no decoder layers found in {type(model).__name__}")
    for layer in layers:
        layer.compile(dynamic=True, mode=mode, backend=backend)
    return len(layers)


def half_compute(cfg: ModelConfig, train_precision: str | None) -> bool:
    """Whether attention computes in bf16/fp16: bf16 autocast in training, the weights' dtype otherwise."""
    if train_precision is not None:
        return train_precision == "bf16"
    return DTYPES[cfg.dtype] in (torch.bfloat16, torch.float16)


CPU_PACK_TOKENS = 2048
SHARE_PREFIX = 16  # model.share_prefix=null


def packing_setup(cfg: ModelConfig, train_precision: str | None) -> dict:
    """The Embedder/Reranker packing arguments and the attn_implementation to load the backbone with."""
    if not cfg.packing:
        return {"attn": resolve_attn_implementation(cfg.attn_implementation), "packing": None}
    from qwen3train.models import packed_attention as attention

    attention.register()
    backend = attention.resolve_backend(cfg.packed_attention, "cuda" if torch.cuda.is_available() else "cpu",
                                      training=train_precision is not None, half=half_compute(cfg, train_precision))
    compiled = compile_enabled(cfg, train_precision)
    multiple = cfg.pack_multiple
    if multiple is None:
        multiple = 256 if cfg.compile_mode == "reduce-overhead" and compiled else 1
    tokens = cfg.pack_tokens
    if tokens is None:
        tokens = 0 if torch.cuda.is_available() else CPU_PACK_TOKENS
    share = SHARE_PREFIX if cfg.share_prefix is None else cfg.share_prefix
    if share:
        why = attention.sharing(backend, "cuda" if torch.cuda.is_available() else "cpu", compiled)
        if why is not None:
            (logger.warning if cfg.share_prefix else logger.info)(
                "shared prefixes off with the %s packed backend: %s", backend, why)
            share = 0
    return {"attn": attention.attn_implementation(backend), "packing": backend, "pack_multiple": multiple,
            "pack_grouped": not compiled, "pack_tokens": tokens or None, "pack_share": share}


def _apply_common(model, cfg: ModelConfig, train_precision: str | None):
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        import peft

        lcfg = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=list(cfg.lora.target_modules))
        model = peft.get_peft_model(model, lcfg)
    if train_precision is not None:  # trainable weights are fp32 masters, whatever was loaded
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    if compile_enabled(cfg, train_precision):
        compile_layers(model, cfg.compile_mode)
    return model


def query_template(cfg: ModelConfig, meta: dict, path: str, train_precision: str | None) -> str:
    """How queries are joined to their instruction. For inference (evaluation, mining, the filter) the export's
    own, when ``model.query_template`` is left at the default: a model trained with another template was
    encoded with the default one, silently (the train/serve mismatch the official formats suffer from). For
    training the config's (it is part of the run's identity), with a note when the export it starts from was
    trained with another."""
    trained = meta.get("query_template")
    if not trained or trained == cfg.query_template:
        return cfg.query_template
    if train_precision is None and cfg.query_template == DEFAULT_QUERY_TEMPLATE:
        return trained
    if train_precision is not None:
        from qwen3train import dist

        if dist.is_main():
            print(f"note: model.query_template={cfg.query_template!r}, but {path} was trained with {trained!r}",
                  flush=True)
    return cfg.query_template


def build_embedder(cfg: ModelConfig, path: str | None = None, train_precision: str | None = None,
                   empty: bool = False, partition=None):
    """Load the decoder with ``AutoModel`` (a ``Qwen3ForCausalLM`` checkpoint gives ``Qwen3Model``).

    ``train_precision`` (``"bf16"``/``"fp32"``) is given when the model is built for training; ``empty``: the
    parameters on the meta device, their values to come from rank 0; ``partition``: built partitioned under ZeRO-3
    (``load_model``).
    """
    from transformers import AutoModel

    from qwen3train.models.embedder import Embedder

    path = path or cfg.weights_path
    pack_kw = packing_setup(cfg, train_precision)
    backbone = load_model(AutoModel, path, empty=empty, partition=partition, dtype=load_dtype(cfg, train_precision),
                          attn_implementation=pack_kw.pop("attn"))
    backbone = _apply_common(backbone, cfg, train_precision)
    tokenizer = load_tokenizer(cfg.tokenizer or path)
    meta = read_meta(path)  # an export's qwen3train.json (what it was trained with), or {}
    of_its_kind(path, meta, "embedder", train_precision is not None)
    emb = Embedder(backbone, tokenizer, query_template=query_template(cfg, meta, path, train_precision),
                   max_query_length=cfg.max_query_length, max_doc_length=cfg.max_doc_length,
                   padding_side=cfg.padding_side, end_token=cfg.end_token or meta.get("end_token"),
                   length_buckets=cfg.length_buckets, **pack_kw)
    emb.export_dtype = DTYPES[cfg.dtype]
    return emb


def build_reranker(cfg: ModelConfig, path: str | None = None, max_length: int | None = None,
                   train_precision: str | None = None, empty: bool = False, partition=None):
    """Load the LM with ``AutoModelForCausalLM``; the reranker prompt is fixed by the spec. ``empty``,
    ``partition``: as ``build_embedder``'s."""
    from transformers import AutoModelForCausalLM

    from qwen3train.models.reranker import Reranker

    path = path or cfg.weights_path
    pack_kw = packing_setup(cfg, train_precision)
    lm = load_model(AutoModelForCausalLM, path, empty=empty, partition=partition,
                    dtype=load_dtype(cfg, train_precision), attn_implementation=pack_kw.pop("attn"))
    lm = _apply_common(lm, cfg, train_precision)
    tokenizer = load_tokenizer(cfg.tokenizer or path)
    of_its_kind(path, read_meta(path), "reranker", train_precision is not None)
    rr = Reranker(lm, tokenizer, max_length=max_length or cfg.max_doc_length,
                  padding_side=cfg.padding_side, **pack_kw)
    rr.export_dtype = DTYPES[cfg.dtype]
    return rr
