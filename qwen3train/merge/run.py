"""Run a MergeConfig: resolve inputs, merge (optionally choosing t by a dev set), report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen3train.errors import ConfigError
from qwen3train.merge.apply import MergeConfig, merge_folders, select_checkpoints


def resolve_inputs(cfg: MergeConfig) -> list[Path]:
    if cfg.inputs:
        return [Path(p) for p in cfg.inputs]
    if not cfg.run_dir:
        raise ConfigError("merge: set inputs=[...] or run_dir=<training run>")
    if cfg.select.best > 0:
        from qwen3train.train.checkpoint import step_dir
        from qwen3train.train.dev_eval import ranked_checkpoints

        ranked = ranked_checkpoints(Path(cfg.run_dir))
        if not ranked:
            raise ConfigError(f"merge.select.best: {cfg.run_dir} has no dev scores of saved checkpoints "
                              f"(train it with run.eval_every and run.eval_file)")
        steps = sorted(s for s, _ in ranked[:cfg.select.best])
        print(f"[merge] the {len(steps)} best checkpoints by dev score: steps {steps} "
              f"({', '.join(f'{s}: {v:.4f}' for s, v in ranked[:cfg.select.best])})")
        return [step_dir(Path(cfg.run_dir), s) / "model" for s in steps]
    return select_checkpoints(cfg.run_dir, cfg.select.last, cfg.select.every)


def run(cfg: MergeConfig) -> Path:
    inputs = resolve_inputs(cfg)
    out = Path(cfg.output_dir)
    kw = dict(method=cfg.method, weights=cfg.weights or None, base=cfg.base, lora_base=cfg.lora_base,
              max_shard_size_mb=cfg.max_shard_size_mb)
    if not cfg.dev_file:
        merged = merge_folders(inputs, out, t=cfg.t, **kw)
        print(f"merged {len(inputs)} checkpoints with {cfg.method} -> {merged}")
        write_card(merged, inputs, f"{cfg.method} t={cfg.t:g}", None)
        return merged
    return _select_by_dev(cfg, inputs, out, kw)


def _source_name(p: Path) -> str:
    """``stage2/step_0000016`` for ``.../stage2/checkpoints/step_0000016/model``."""
    parts = [x for x in p.parts if x not in ("model", "checkpoints")]
    return "/".join(parts[-2:])


def write_card(out: Path, inputs: list[Path], method: str, note: str | None, record_sources: bool = True) -> None:
    """The merged export's model card: the lineage of the last (most trained) input, then this merge."""
    from qwen3train.models.card import inherited, read_meta, set_card

    if "card" not in read_meta(inputs[-1]):
        return  # inputs not exported by qwen3train (no facts to carry)
    base, lineage = inherited(inputs[-1])
    entry = {"stage": "merge", "method": method, "sources": [_source_name(p) for p in inputs] if record_sources else []}
    if note:
        entry["note"] = note
    set_card(out, base_model=base, lineage=lineage + [entry], license=read_meta(inputs[-1])["card"].get("license", "apache-2.0"),
             evaluation=[])


def merge_pays(merge_vals: list[float], input_vals: list[float], confidence: float,
               samples: int = 2000) -> tuple[bool, float]:
    """Keep the merge when its dev mean is at least the input's (a tie keeps the merge) and, with
    ``confidence`` > 0, the paired bootstrap gives it at least that probability of being better."""
    from qwen3train.eval.metrics import paired_bootstrap

    p = paired_bootstrap(merge_vals, input_vals, samples)
    mean_ok = sum(merge_vals) / len(merge_vals) >= sum(input_vals) / len(input_vals)
    return bool(mean_ok and (confidence <= 0 or p >= confidence)), p


def _select_by_dev(cfg: MergeConfig, inputs: list[Path], out: Path, kw: dict) -> Path:
    """Merge at each candidate t (``candidates_t``, else ``t``), score the merges and the inputs on the dev
    pairs, keep the best by ``dev_metric``. Merging does not always pay (close checkpoints, a run that
    kept improving): when the best merge does not beat the best input checkpoint -- by its dev mean, and
    with ``confidence`` > 0 also with that probability under a paired bootstrap over the dev queries --
    that checkpoint is the output, and ``merge_selection.json`` says so (``fallback: true``)."""
    from qwen3train.eval.encoder import Encoder
    from qwen3train.eval.pairs import evaluate_pairs
    from qwen3train.models.card import read_meta

    for p in inputs:
        if read_meta(p).get("kind") == "reranker":
            raise ConfigError(f"merge.dev_file scores embedders on dev pairs; {p} is a reranker: unset dev_file")

    def score(path: Path) -> tuple[dict, list[float]]:
        enc = Encoder(path, max_length=256, batch_size=64, precision=cfg.dev_precision, label=f"dev {'/'.join(Path(path).parts[-2:])}")
        got = evaluate_pairs(path, cfg.dev_file, encoder=enc, per_query=True)
        return {k: v for k, v in got.items() if k != "per_query"}, got["per_query"][cfg.dev_metric]

    rows, cands = [], []  # cands: (mean, is_merge, path, name, per-query values)
    trial_root = out.with_name(f"{out.name}_trials")
    for t in cfg.candidates_t or [cfg.t]:
        cand = merge_folders(inputs, trial_root / f"t{t:g}", t=t, **kw)
        row, per_q = score(cand)
        rows.append({"candidate": f"{cfg.method} t={t:g}", "kind": "merge", **row})
        cands.append((row[cfg.dev_metric], 1, cand, rows[-1]["candidate"], per_q))
    for p in inputs:
        row, per_q = score(p)
        rows.append({"candidate": f"input {p}", "kind": "input", **row})
        cands.append((row[cfg.dev_metric], 0, p, rows[-1]["candidate"], per_q))
    best_merge = max((c for c in cands if c[1]), key=lambda c: c[0])
    best_input = max((c for c in cands if not c[1]), key=lambda c: c[0])
    keep, p_better = merge_pays(best_merge[4], best_input[4], cfg.confidence, cfg.dev_bootstrap)
    value, is_merge, best, name, _ = best_merge if keep else best_input
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(trial_root, ignore_errors=True)
    summary = {"metric": cfg.dev_metric, "dev_file": cfg.dev_file, "chosen": name, "score": value,
               "fallback": not is_merge, "best_merge": best_merge[3], "best_merge_score": best_merge[0],
               "best_input": best_input[3], "best_input_score": best_input[0], "p_merge_better": p_better,
               "confidence": cfg.confidence, "queries": len(best_input[4]), "candidates": rows}
    (out / "merge_selection.json").write_text(json.dumps(summary, indent=2))
    gap = (f"best merge {best_merge[0]:.4f} vs {best_input[0]:.4f}, P(merge better) {p_better:.2f} "
           f"over {len(best_input[4])} dev queries" + (f", needed {cfg.confidence:g}" if cfg.confidence > 0 else ""))
    note = (f"kept by {cfg.dev_metric} on the dev file ({gap})" if is_merge else
            f"merging did not pay on the dev file ({gap}): this is {name[6:]}")
    if is_merge:
        write_card(out, inputs, name, note)
        print(f"[merge] kept {name}: {cfg.dev_metric} on {cfg.dev_file}: {gap}")
    else:  # the output is a checkpoint: its own card, plus the merge that was tried and not applied
        write_card(out, [out], f"{cfg.method} (not applied; tried on {', '.join(_source_name(p) for p in inputs)})", note,
                   record_sources=False)
        print(f"[merge] merging did not pay on {cfg.dev_file} ({gap}); the checkpoint {name[6:]} is the output (fallback)")
    return out
