"""MergeConfig and the streaming application of a merge method to checkpoint folders.

    make merge ARGS="run_dir=outputs/stage2 select.last=3 method=multislerp"
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen3train.merge import get_method
from qwen3train.merge.gram import BufferRing, combine, combine_chunks, gram
from qwen3train.merge.io import (MergeError, StreamingSafetensorsWriter, check_compatible, open_checkpoint,
                                 plan_shards, stream_tensors)

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class SelectConfig:
    """Which checkpoints of ``run_dir`` to merge: the last ``last`` (0: all) of every ``every``-th; or,
    with ``best > 0``, the ``best`` checkpoints by the dev score recorded during training
    (``run.eval_every``, ``dev_eval.jsonl``), merged in step order."""

    last: int = 3
    every: int = 1
    best: int = 0


@dataclass
class MergeConfig:
    """Merge N checkpoints (stage 3). Paper: slerp over stage-2 checkpoints; the number of
    checkpoints, their selection, t and the >2-way scheme are UNCONFIRMED (spec §5.3), so all are
    configurable. Default: multislerp (weighted spherical mean) of the last 3 saved checkpoints.

    inputs: checkpoint folders (full models or LoRA adapters); empty: select from ``run_dir``.
    weights: per-input weights (empty: equal). t: slerp's interpolation parameter (2 inputs).
    base: task-vector mode: merge x_i - base, add base back (slerp of task vectors).
    """

    inputs: list[str] = field(default_factory=list)
    run_dir: str | None = "outputs/stage2"
    select: SelectConfig = field(default_factory=SelectConfig)
    method: str = "multislerp"
    weights: list[float] = field(default_factory=list)
    t: float = 0.5
    base: str | None = None
    lora_base: str | None = None
    output_dir: str = "outputs/merged"
    max_shard_size_mb: int = 2048
    # selection on dev pairs (never an evaluation set): the merge at each t in candidates_t (else t)
    # against each input checkpoint, by dev_metric; an input that beats every merge is the output
    dev_file: str | None = None
    candidates_t: list[float] = field(default_factory=list)
    dev_metric: str = "ndcg@10"
    # the merge must beat the best input with this probability under a paired bootstrap over the dev
    # queries (resampled dev_bootstrap times); 0: a higher dev mean is enough. A 120-query dev split won
    # by +0.004 lost 0.014 on the evaluation sets (docs/benchmarks.md): small gains are noise
    confidence: float = 0.0
    dev_bootstrap: int = 2000
    dev_precision: str = "float32"  # the encoder's compute dtype for dev scoring (auto: bf16 where native)

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.dev_metric not in ("ndcg@10", "mrr@10", "recall@100"):
            raise ValueError(f"merge.dev_metric must be ndcg@10, mrr@10 or recall@100, got {self.dev_metric!r}")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"merge.confidence must be in [0, 1), got {self.confidence}")
        if self.dev_bootstrap < 100:
            raise ValueError(f"merge.dev_bootstrap must be >= 100, got {self.dev_bootstrap}")
        from qwen3train.precision import precision_name

        precision_name(self.dev_precision, "merge.dev_precision")


def select_checkpoints(run_dir: str | Path, last: int, every: int) -> list[Path]:
    """Exported models of a training run's checkpoints (``checkpoints/step_*/model``), by step."""
    base = Path(run_dir) / "checkpoints"
    found = sorted((p for p in base.glob("step_*") if (p / "model").is_dir() and (p / "train_state.json").exists()),
                   key=lambda p: int(p.name.split("_")[1]))
    found = found[::-1][::max(every, 1)][::-1]
    if last > 0:
        found = found[-last:]
    if not found:
        raise MergeError(f"no complete checkpoints with an exported model under {base}")
    return [p / "model" for p in found]


def coefficients_for(method, tensors: list[torch.Tensor], weights: torch.Tensor, t: float,
                     base: torch.Tensor | None):
    """(tensors to combine, coefficients). Task-vector mode folds the base in as one more input:
    base + sum c_i (x_i - base) = (1 - sum c_i) base + sum c_i x_i."""
    if base is None:
        return tensors, method(gram(tensors), weights, t)
    g_all = gram(tensors + [base])
    n = len(tensors)
    # Gram of the task vectors x_i - base from the Gram of (x_1..x_n, base)
    gb = g_all[:n, :n] - g_all[:n, n:n + 1] - g_all[n:n + 1, :n] + g_all[n, n]
    c = method(gb, weights, t)
    return tensors + [base], torch.cat([c, (1.0 - c.sum()).reshape(1)])


def merge_state_dicts(state_dicts: list[dict], method: str, weights=None, t: float = 0.5,
                      base: dict | None = None) -> dict:
    """In-memory reference: merge whole state dicts (same names) with the registry's method."""
    fn = get_method(method)
    w = torch.tensor(weights or [1.0] * len(state_dicts), dtype=torch.float64)
    out = {}
    for k in state_dicts[0]:
        xs = [sd[k] for sd in state_dicts]
        if not xs[0].is_floating_point():
            out[k] = xs[0].clone()
            continue
        xs, c = coefficients_for(fn, xs, w, t, None if base is None else base[k])
        out[k] = combine(xs, c, xs[0].dtype)
    return out


def _one_kind(paths: list[Path]) -> None:
    """Exports of ours say what they are (``qwen3train.json``): an embedder merged with a reranker has the same
    tensors where the LM head is tied to the embeddings (Qwen3-0.6B), and would be written as the first one's
    kind, silently. A folder of another origin (a base LM, a released checkpoint: LM-Cocktail's use) says
    nothing and is merged with either."""
    from qwen3train.models.card import kind_name, read_meta

    known = [(p, k) for p, k in ((p, read_meta(p).get("kind")) for p in paths) if k]
    for p, k in known[1:]:
        if k != known[0][1]:
            raise MergeError(f"merge inputs of two kinds: {known[0][0]} is {kind_name(known[0][1])}, {p} "
                             f"{kind_name(k)} (their qwen3train.json): merge checkpoints of one track")


def merge_folders(inputs: list[str | Path], output_dir: str | Path, method: str = "slerp", weights=None,
                  t: float = 0.5, base: str | Path | None = None, lora_base: str | Path | None = None,
                  max_shard_size_mb: int = 2048) -> Path:
    """Stream-merge checkpoint folders into ``output_dir`` (sharded safetensors + the first input's
    config, tokenizer and sentence-transformers files). Written to a ``.tmp`` folder, then renamed."""
    paths = [Path(p) for p in inputs]
    from qwen3train.integrity import describe, verify
    from qwen3train.merge.io import MergeError

    for p in paths:  # a damaged input would be merged silently into every output tensor
        problems = verify(p)
        if problems:
            raise MergeError(f"merge input {p} is damaged ({describe(problems)}); restore it or leave it out")
    if len(paths) < 2:
        raise MergeError(f"need at least 2 checkpoints to merge, got {len(paths)}")
    _one_kind(paths + ([Path(base)] if base else []))
    fn = get_method(method)
    readers = [open_checkpoint(p, lora_base) for p in paths]
    keys = check_compatible(readers, paths)
    base_reader = open_checkpoint(base, lora_base) if base else None
    if base_reader is not None:
        check_compatible([readers[0], base_reader], [paths[0], Path(base)])
    w = torch.tensor(weights or [1.0] * len(paths), dtype=torch.float64)
    if len(w) != len(paths):
        raise MergeError(f"{len(w)} weights for {len(paths)} inputs")
    out = Path(output_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _copy_side_files(readers[0].source_folder, tmp)
    metas = {k: readers[0].meta(k) for k in keys}
    names = readers[0].names
    shards = plan_shards(keys, metas, max_shard_size_mb * 2**20)
    total = len(shards)
    weight_map = {}
    ring = BufferRing(StreamingSafetensorsWriter.QUEUE + 2)
    all_readers = readers + ([base_reader] if base_reader is not None else [])
    from qwen3train.progress import Progress

    bar = Progress(len(keys), f"merge ({method}) -> {Path(output_dir).name}", "tensors")
    for si, shard in enumerate(shards):
        fname = "model.safetensors" if total == 1 else f"model-{si + 1:05d}-of-{total:05d}.safetensors"
        entries = [(names[k], *metas[k]) for k in shard]
        writer = StreamingSafetensorsWriter(tmp / fname, entries)
        # one tensor per input alive at a time; the next one's pages are mapped meanwhile
        for k, tensors in stream_tensors(all_readers, shard):
            xs, b = tensors[:len(readers)], (tensors[-1] if base_reader is not None else None)
            if not xs[0].is_floating_point():
                writer.write_chunk(xs[0])
            else:
                xs, c = coefficients_for(fn, xs, w, t, b)
                for chunk in combine_chunks(xs, c, metas[k][0], buffers=ring):
                    writer.write_chunk(chunk)
            weight_map[names[k]] = fname
            del xs, tensors, b
            bar.update()
        writer.close()
    bar.close()
    if total > 1:
        size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    (tmp / "merge.json").write_text(json.dumps(
        {"method": method, "inputs": [str(p) for p in paths], "weights": w.tolist(), "t": t,
         "base": str(base) if base else None}, indent=2))
    from qwen3train.integrity import write_manifest

    write_manifest(tmp)  # the output checks itself when it is read (a later merge, evaluation)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, sentence-transformers modules: everything that is not weights."""
    for p in src.iterdir():
        if p.name.startswith(".") or p.name in ("merge.json", "adapter_config.json", "checksums.json") or \
                p.name.endswith(WEIGHT_FILES) or p.name.endswith(".index.json"):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
