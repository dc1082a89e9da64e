"""Stage 0: synthetic query/document pairs written by an LLM with the paper's two-step prompting."""
