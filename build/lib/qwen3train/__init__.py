"""qwen3train: the Qwen3-Embedding / Qwen3-Reranker training pipeline."""

__version__ = "0.1.0"
