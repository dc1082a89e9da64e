"""ModelConfig and the builders that turn it into an Embedder or a Reranker (plain arguments below)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from qwen3train.errors import ConfigError
from qwen3train.text import DEFAULT_INSTRUCTION, DEFAULT_QUERY_TEMPLATE

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
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
    # Training forward: rows sorted by length and run in up to this many groups, each cut to its
    # longest row (1 = one padded batch). Same results, fewer padded tokens. null = auto: 4 on the
    # CPU (compute-bound: 2.0x faster SmolLM2 steps), 1 on CUDA, where a 0.6B model's step is bound by kernel
    # launches and each group adds a forward and a backward (measured, docs/benchmarks.md).
    length_buckets: int | None = None
    # torch.compile each decoder layer (regional compilation, dynamic shapes) for training: fuses the
    # elementwise work (norms, rotary, activations) that dominates small models in eager mode.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"model.padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.length_buckets is not None and self.length_buckets < 1:
            raise ValueError(f"model.length_buckets must be >= 1, got {self.length_buckets}")
        if "{query}" not in self.query_template:
            raise ValueError(f"model.query_template must contain {{query}}: {self.query_template!r}")

    @property
    def weights_path(self) -> str:
        return self.init_from or self.name_or_path


def pretrained(loader, path: str, **kw):
    """``loader.from_pretrained(path)``, with a folder or hub name that cannot be loaded reported as a
    user's mistake (ConfigError, one line) rather than a traceback from deep inside transformers."""
    try:
        return loader.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        from pathlib import Path

        local = path.startswith(("/", ".", "~")) or path.count("/") != 1  # a hub name is owner/name
        where = "no such folder" if local and not Path(path).expanduser().exists() else str(e).strip().splitlines()[0]
        raise ConfigError(f"cannot load {loader.__name__} from {path!r}: {where}") from e


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


def export_meta(path: str) -> dict:
    """``qwen3train.json`` of an export (what it was trained with), or {} for any other checkpoint."""
    import json
    from pathlib import Path

    meta = Path(path) / "qwen3train.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def load_dtype(cfg: ModelConfig, train_precision: str | None) -> torch.dtype:
    """The dtype weights are loaded in: ``model.dtype`` for inference; float32 for training (master
    weights, see ``qwen3train.precision``), except frozen LoRA base weights under bf16 compute,
    which stay in ``model.dtype`` (they are never updated, and bf16 halves their memory)."""
    if train_precision is None:
        return DTYPES[cfg.dtype]
    if cfg.lora.enabled and train_precision == "bf16":
        return DTYPES[cfg.dtype]
    return torch.float32


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
    if cfg.compile and train_precision is not None:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        if not layers:
            raise ConfigError(f"model.compile=true: no decoder layers found in {type(model).__name__}")
        for layer in layers:  # one compiled graph serves every layer (same code, same shapes)
            layer.compile(dynamic=True)
    return model


def build_embedder(cfg: ModelConfig, path: str | None = None, train_precision: str | None = None):
    """Load the decoder with ``AutoModel`` (a ``Qwen3ForCausalLM`` checkpoint gives ``Qwen3Model``).

    ``train_precision`` (``"bf16"``/``"fp32"``) is given when the model is built for training.
    """
    from transformers import AutoModel

    from qwen3train.models.embedder import Embedder

    path = path or cfg.weights_path
    backbone = pretrained(AutoModel, path, dtype=load_dtype(cfg, train_precision),
                                         attn_implementation=resolve_attn_implementation(cfg.attn_implementation))
    backbone = _apply_common(backbone, cfg, train_precision)
    tokenizer = load_tokenizer(cfg.tokenizer or path)
    emb = Embedder(backbone, tokenizer, query_template=cfg.query_template,
                   max_query_length=cfg.max_query_length, max_doc_length=cfg.max_doc_length,
                   padding_side=cfg.padding_side, end_token=cfg.end_token or export_meta(path).get("end_token"),
                   length_buckets=cfg.length_buckets)
    emb.export_dtype = DTYPES[cfg.dtype]
    return emb


def build_reranker(cfg: ModelConfig, path: str | None = None, max_length: int | None = None,
                   train_precision: str | None = None):
    """Load the LM with ``AutoModelForCausalLM``; the reranker prompt is fixed by the spec."""
    from transformers import AutoModelForCausalLM

    from qwen3train.models.reranker import Reranker

    path = path or cfg.weights_path
    lm = pretrained(AutoModelForCausalLM, path, dtype=load_dtype(cfg, train_precision),
                                              attn_implementation=resolve_attn_implementation(cfg.attn_implementation))
    lm = _apply_common(lm, cfg, train_precision)
    tokenizer = load_tokenizer(cfg.tokenizer or path)
    rr = Reranker(lm, tokenizer, max_length=max_length or cfg.max_doc_length,
                  padding_side=cfg.padding_side)
    rr.export_dtype = DTYPES[cfg.dtype]
    return rr
