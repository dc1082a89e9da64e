"""Run a MergeConfig: resolve inputs, merge (optionally choosing t by a dev set), report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen3train.merge.apply import MergeConfig, merge_folders, select_checkpoints


def resolve_inputs(cfg: MergeConfig) -> list[Path]:
    if cfg.inputs:
        return [Path(p) for p in cfg.inputs]
    if not cfg.run_dir:
        raise ValueError("merge: set inputs=[...] or run_dir=<training run>")
    return select_checkpoints(cfg.run_dir, cfg.select.last, cfg.select.every)


def run(cfg: MergeConfig) -> Path:
    inputs = resolve_inputs(cfg)
    out = Path(cfg.output_dir)
    kw = dict(method=cfg.method, weights=cfg.weights or None, base=cfg.base, lora_base=cfg.lora_base,
              max_shard_size_mb=cfg.max_shard_size_mb)
    if not (cfg.dev_file and cfg.candidates_t):
        merged = merge_folders(inputs, out, t=cfg.t, **kw)
        print(f"merged {len(inputs)} checkpoints with {cfg.method} -> {merged}")
        return merged
    # selection by evaluation: try each t (and the inputs alone), keep the best on the dev pairs
    from qwen3train.eval.pairs import evaluate_pairs

    rows, best = [], None
    trial_root = out.with_name(f"{out.name}_trials")
    for p in inputs:
        rows.append({"candidate": f"input {p}", **evaluate_pairs(p, cfg.dev_file)})
    for t in cfg.candidates_t:
        cand = merge_folders(inputs, trial_root / f"t{t:g}", t=t, **kw)
        score = evaluate_pairs(cand, cfg.dev_file)
        rows.append({"candidate": f"{cfg.method} t={t:g}", **score})
        if best is None or score["mrr@10"] > best[1]:
            best = (cand, score["mrr@10"])
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(best[0], out)
    shutil.rmtree(trial_root, ignore_errors=True)
    (out / "merge_selection.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return out
