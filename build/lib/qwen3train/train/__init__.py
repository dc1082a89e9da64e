"""Training: the one loop for stage 1, stage 2 and the reranker."""
