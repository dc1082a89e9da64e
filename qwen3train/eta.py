"""The pipeline's ETA: each stage's size in work units, a rate that learns from the stages done.

Units are tokens through the model, weighted by what a token costs: a training token 3 forward
passes (forward + backward), an encoded token 1, a generated token ``GEN_WEIGHT`` (decoding one token at
a time is memory-bound). Before any stage has run, a unit costs ``2 * N / throughput`` seconds with a
nominal device throughput; after that, the seconds the stages run so far took per unit, so the ETA of
the remaining stages tracks this machine. Sizes come from the config alone (counts of records not
yet written are estimated from the inputs that exist), so the figure is an estimate, printed as one.
"""

from __future__ import annotations

from pathlib import Path

GEN_WEIGHT = 20.0  # a generated token ~ 20 forward tokens on the CPU (batched, memory-bound decode)
CPU_FLOPS, GPU_FLOPS = 2.5e11, 3e14  # nominal effective FLOP/s before the first stage measures the machine


def _lines(path: str | Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _params(model_dir: str) -> float:
    """Non-embedding parameters from a config.json (12 * layers * hidden^2 as a fallback shape)."""
    import json

    try:
        c = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 1e8
    h, layers = c.get("hidden_size", 768), c.get("num_hidden_layers", 12)
    ffn = c.get("intermediate_size", 4 * h)
    return layers * (4 * h * h + 3 * h * ffn)


def stage_units(cfg, name: str) -> float:
    """Work units of stage ``name`` of a PipelineConfig (forward-token equivalents)."""
    doc = cfg.model.max_doc_length / 2  # a text's mean length, guessed as half its budget
    passages = cfg.synth.max_passages or sum(_lines(p) for p in cfg.synth.corpus)
    pairs = passages + sum(_lines(p) for p in cfg.extra_stage2_data)
    if name == "synth":
        return passages * 2 * cfg.synth.sampling.max_new_tokens * GEN_WEIGHT
    if name in ("stage1", "stage2", "rerank"):
        st = getattr(cfg, name)
        k = st.data.num_hard_negatives
        length = (st.max_length or cfg.model.max_doc_length) / 2
        return 3 * st.run.max_steps * st.engine.global_batch_size * (1 + k) * length
    if name == "filter":
        return passages * 2 * cfg.filter.max_length / 2
    if name == "mine":
        return 2 * pairs * cfg.mine.max_length / 2
    if name in ("merge", "rerank_merge"):
        dev = _lines(cfg.merge.dev_file) if cfg.merge.dev_file and name == "merge" else 0
        trials = len(cfg.merge.candidates_t or [cfg.merge.t]) + cfg.merge.select.last
        return 2e5 + trials * dev * 2 * doc  # the tensors' streaming, then dev scoring
    if name == "eval":
        models = 4 + (1 if cfg.baseline else 0)
        per_col = (cfg.eval.max_docs or 2000) + 200
        texts = len(cfg.eval.collections) * per_col + 400 * len(cfg.eval.pairs)
        rerank = len(cfg.eval.collections) * 50 * cfg.rerank_top_k * 2
        return (models * texts + rerank) * cfg.eval.max_length / 2
    return 0.0


class ETA:
    """``start(name)`` / ``done(name, seconds)``; ``remaining(names)`` -> seconds, learning the rate."""

    def __init__(self, cfg) -> None:
        import torch

        self.cfg = cfg
        flops = GPU_FLOPS * max(cfg.ngpu, 1) if torch.cuda.is_available() else CPU_FLOPS
        self.rate = 2 * _params(cfg.model.name_or_path) / flops  # seconds per forward token, until measured
        self.units_done = self.spent = 0.0

    def units(self, name: str) -> float:
        return stage_units(self.cfg, name)

    def done(self, name: str, seconds: float) -> None:
        """A stage that ran here took ``seconds``: the rate becomes what the stages run so far showed."""
        self.units_done += self.units(name)
        self.spent += seconds
        if self.units_done > 0:
            self.rate = self.spent / self.units_done

    def remaining(self, names: list[str]) -> float:
        return sum(self.units(n) for n in names) * self.rate


def fmt(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
