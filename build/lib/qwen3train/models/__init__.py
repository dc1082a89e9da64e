"""Models: the Qwen3 embedder and yes/no reranker, their builders and exports."""
