"""Stage-2 data: cosine filtering of synthetic pairs and hard-negative mining."""
