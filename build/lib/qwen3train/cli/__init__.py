"""Command-line entry points: Hydra at the edge, typed objects below."""
