"""The pipeline's ETA: each stage's size in work units, a rate that learns from the stages done.

Units are tokens through the model, weighted by what a token costs: a training token 3 forward
passes (forward + backward), an encoded token 1, a generated token ``GEN_WEIGHT`` (decoding one token at
a time is memory-bound), with one rate per kind of work: a default per parameter for this kind of
device until a stage of that kind ran here, then what it measured, so the ETA of the remaining stages
tracks this machine. Sizes come from the config alone (counts of records not
yet written are estimated from the inputs that exist), so the figure is an estimate, printed as one.
"""

from __future__ import annotations

from pathlib import Path

GEN_WEIGHT = 20.0  # a generated token ~ 20 forward tokens (decoding one token at a time is memory-bound)
# seconds per unit per 2 x non-embedding parameters, by kind of work, read off `make pipeline` on 2 CPU
# cores (SmolLM2-135M, bf16), a stage's start taken off: training 3.9-6.1e-12 (4.9e-12 over the three
# training stages), encoding 0.5-1.0e-12 (0.79e-12 over the five encoding stages; 1.6-2.4e-12 before packed
# encoding and shared prefixes), generation 2.0e-12 (2026-12-05, docs/benchmarks.md); a GPU ~1,000x less
SECONDS_PER_UNIT_PARAM = {"train": 5e-12, "encode": 0.8e-12, "generate": 2e-12}
# generation is measured on vLLM; transformers' batched generate takes this many times as long on the same model
# and prompts: 7.2x (bench/bench_synth.py, CPU) and 6.6x in `make smoke` (stage 0: 51.7 s, 43.2 s past its start,
# priced at 6.5 s with the vLLM rate; 2026-12-05)
TRANSFORMERS_GENERATION = 7.0
PRIOR_UNITS = 1e5  # the default counts as this many units measured: a small stage does not swing the rate
GPU_SPEEDUP = 1000.0
# a stage process's fixed start (python, torch and transformers imports, loading its models): `make smoke` on
# 2 CPU cores, whose training and encoding stages have next to no work, took 6.7-10.1 s each (median 8.5);
# on a GPU, CUDA's start and compilation on top
STAGE_START_S = {"cpu": 8.5, "cuda": 20.0}
IN_PROCESS = {"report"}  # stages run inside the pipeline's own process
# tokens a reranker computes per real token when a query's prompt + query run once for its documents
# (model.share_prefix; bench/bench_share_prefix.py: 0.48 for 1 positive + 3 negatives at length 128)
RERANK_SHARED = 0.5
KIND = {"synth": "generate", "stage1": "train", "stage2": "train", "rerank": "train", "filter": "encode",
        "mine": "encode", "rerank_mine": "encode", "merge": "encode", "rerank_merge": "encode", "eval": "encode",
        "report": "encode"}


def _lines(path: str | Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _config_file(model: str) -> Path:
    """A model's config.json: in its folder, else (a hub name, ``owner/name``) in the local Hugging Face cache
    when the model was downloaded before. Never a download: an ETA is not worth a network call."""
    path = Path(model) / "config.json"
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return path
    try:
        import os

        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception:  # noqa: BLE001 - an unreadable cache only costs the estimate its shape
        return path
    return Path(cached) if isinstance(cached, str) else path


def _params(model: str) -> float:
    """Non-embedding parameters from a config.json (1e8 when no config can be read: a model not yet
    downloaded; the rates learned from the first stages then correct the estimate)."""
    import json

    try:
        c = json.loads(_config_file(model).read_text())
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
        from qwen3train.synth.backend import resolve_backend

        slower = TRANSFORMERS_GENERATION if resolve_backend(cfg.synth.backend) == "transformers" else 1.0
        return passages * 2 * cfg.synth.sampling.max_new_tokens * GEN_WEIGHT * slower
    if name in ("stage1", "stage2", "rerank"):
        st = getattr(cfg, name)
        k = st.data.num_hard_negatives
        length = (st.max_length or cfg.model.max_doc_length) / 2
        units = 3 * st.run.max_steps * st.engine.global_batch_size * (1 + k) * length
        if name == "rerank" and cfg.model.share_prefix != 0:
            units *= RERANK_SHARED
        return units
    if name == "filter":
        return passages * 2 * cfg.filter.max_length / 2
    if name in ("mine", "rerank_mine"):
        sample = cfg.rerank_mine_records if name == "rerank_mine" else cfg.mine.sample
        records = min(sample, pairs) if sample else pairs
        return 2 * records * cfg.mine.max_length / 2
    if name in ("merge", "rerank_merge"):
        dev = _lines(cfg.merge.dev_file) if cfg.merge.dev_file and name == "merge" else 0
        trials = len(cfg.merge.candidates_t or [cfg.merge.t]) + cfg.merge.select.last
        return 5e4 + trials * dev * 2 * doc  # the tensors' streaming, then dev scoring
    if name == "eval":
        models = 4 + (1 if cfg.baseline else 0)
        per_col = (cfg.eval.max_docs or 2000) + 50
        texts = len(cfg.eval.collections) * per_col + 400 * len(cfg.eval.pairs)
        rerank = len(cfg.eval.collections) * 50 * cfg.rerank_top_k * 2
        if cfg.rerank_fusion == "dev" and cfg.merge.dev_file:  # the fusion weight's dev pairs, reranked too
            rerank += _lines(cfg.merge.dev_file) * (cfg.rerank_top_k * 2 + 2)
        return (models * texts + rerank) * cfg.eval.max_length / 2
    return 0.0


class ETA:
    """``done(name, seconds)`` after each stage that ran; ``remaining(names)`` -> seconds.

    A stage costs a fixed start (its process: imports, loading models; ``STAGE_START_S``) plus its work:
    units x 2 x the non-embedding parameters of the model that does it (stage 0's generator, else the
    model being trained). Each kind of work (training, encoding, generation) has its own rate per unit and
    parameter: the default for this device until a stage of that kind has run here, then the measured one;
    kinds not yet seen are scaled by how far the measured kinds were from their defaults. Scaling by the
    stage's own model matters when they differ: the smoke run generates with SmolLM2-135M and trains a
    random model ~1,500x smaller, and pricing its training at the generator's measured rate per *training*
    parameter made a 2-minute run announce 25 minutes."""

    def __init__(self, cfg) -> None:
        import torch

        self.cfg = cfg
        cuda = torch.cuda.is_available()
        speed = GPU_SPEEDUP * max(cfg.ngpu, 1) if cuda else 1.0
        self.start_s = STAGE_START_S["cuda" if cuda else "cpu"]
        self.default = {k: v / speed for k, v in SECONDS_PER_UNIT_PARAM.items()}
        self.prior = PRIOR_UNITS * 2 * _params(cfg.model.name_or_path)  # in work (units x 2 x parameters)
        self.spent = {k: 0.0 for k in self.default}
        self.work_done = {k: 0.0 for k in self.default}

    def units(self, name: str) -> float:
        return stage_units(self.cfg, name)

    def work(self, name: str) -> float:
        model = self.cfg.synth.generator if name == "synth" else self.cfg.model.name_or_path
        return self.units(name) * 2 * _params(model)

    def start(self, name: str) -> float:
        return 0.0 if name in IN_PROCESS else self.start_s

    def done(self, name: str, seconds: float) -> None:
        kind = KIND.get(name, "encode")
        self.work_done[kind] += self.work(name)
        self.spent[kind] += max(seconds - self.start(name), 0.0)

    def rate(self, kind: str) -> float:
        seen = [k for k in self.default if self.work_done[k] > 0]
        if not seen:
            return self.default[kind]
        if self.work_done[kind] > 0:  # measured, with the default as a prior of PRIOR_UNITS units
            return (self.spent[kind] + self.prior * self.default[kind]) / (self.work_done[kind] + self.prior)
        ratio = sum(self.spent[k] for k in seen) / sum(self.work_done[k] * self.default[k] for k in seen)
        return self.default[kind] * ratio

    def remaining(self, names: list[str]) -> float:
        return sum(self.start(n) + self.work(n) * self.rate(KIND.get(n, "encode")) for n in names)


def fmt(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
