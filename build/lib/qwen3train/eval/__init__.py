"""Evaluation: metrics (pure), retrieval on pair files and BEIR/TREC collections."""
