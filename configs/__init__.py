"""The configs, shipped in the wheel as qwen3train.configs (see pyproject.toml)."""
