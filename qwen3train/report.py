"""The pipeline's ``report.md``: per-stage curves, the filter histogram, generation statistics, and
one table and bar chart of every evaluated model on every dataset with the deltas per stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def training_curves(out: Path, stages: list[str]) -> str | None:
    plt = _plt()
    keys = [("loss", "loss"), ("acc", "in-batch top-1 / group accuracy"), ("margin", "pos - hardest neg cosine"),
            ("fn_masked_frac", "fraction masked as false negatives")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=110)
    drew = False
    for stage in stages:
        rows = _metrics(out / stage / "metrics.jsonl")
        if not rows:
            continue
        for ax, (k, title) in zip(axes, keys):
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("step")
                drew = True
    if not drew:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report_training.png")
    plt.close(fig)
    return "report_training.png"


def skipped_steps(out: Path, stages: list[str]) -> list[str]:
    """One line per stage that skipped steps with non-finite gradients (``run.skip_nonfinite_steps``)."""
    lines = []
    for stage in stages:
        rows = _metrics(out / stage / "skipped_steps.jsonl")
        if rows:
            steps = ", ".join(str(r["step"]) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            lines.append(f"- {stage}: **{len(rows)} step(s) skipped** with non-finite loss or gradients (steps "
                         f"{steps}; no update applied; their records: `{stage}/skipped_steps.jsonl`).")
    return lines + [""] if lines else []


def generation_chart(stats: dict, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), dpi=110)
    for ax, key, title in ((axes[0], "by_task", "pairs by task"), (axes[1], "rejected_by_reason", "rejections")):
        items = sorted(stats.get(key, {}).items(), key=lambda kv: -kv[1])[:12]
        if items:
            ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#55a868")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "report_generation.png")
    plt.close(fig)
    return "report_generation.png"


def results_chart(rows: list[dict], out: Path) -> str:
    plt = _plt()
    full = [r for r in rows if r.get("dim") is None and "ndcg@10" in r]
    datasets = sorted({r["dataset"] for r in full})
    models = list(dict.fromkeys(r["model"] for r in full))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), dpi=110, squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        vals = {r["model"]: r["ndcg@10"] for r in full if r["dataset"] == ds}
        names = [m for m in models if m in vals]
        ax.bar(range(len(names)), [vals[m] for m in names], color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{ds}: nDCG@10", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "report_results.png")
    plt.close(fig)
    return "report_results.png"


def stage_deltas(rows: list[dict]) -> list[str]:
    """nDCG@10 change per stage on each dataset: base -> stage 1 -> last stage-2 checkpoint -> merged."""
    full = [r for r in rows if r.get("dim") is None and "ndcg@10" in r]
    lines = []
    for ds in sorted({r["dataset"] for r in full}):
        v = {r["model"]: r["ndcg@10"] for r in full if r["dataset"] == ds}
        s2 = sorted((m for m in v if m.startswith("stage2@")), key=lambda m: int(m.split("@")[1]))
        chain = [m for m in ["base", "stage1"] + s2[-1:] + ["merged"] if m in v]
        parts = [f"{chain[0]} {v[chain[0]]:.4f}"] + [f"{b} {v[b]:.4f} ({v[b] - v[a]:+.4f})" for a, b in zip(chain, chain[1:])]
        lines.append(f"- **{ds}**: " + " → ".join(parts))
    return lines


def _avg(rows: list[dict], model: str, datasets: list[str]) -> float | None:
    v = {r["dataset"]: r["ndcg@10"] for r in rows if r["model"] == model and r.get("dim") is None and "ndcg@10" in r}
    if not datasets or any(d not in v for d in datasets):
        return None
    return sum(v[d] for d in datasets) / len(datasets)


def summary(rows: list[dict], out: Path) -> list[str]:
    """Average nDCG@10 per stage over the retrieval datasets every stage was scored on, the recipe's
    targets checked one by one, where the model stands against BM25, STS, and the merge decision."""
    models = {r["model"] for r in rows}
    s2 = sorted((m for m in models if m.startswith("stage2@")), key=lambda m: int(m.split("@")[1]))
    chain = [m for m in ["base", "stage1"] + s2[-1:] + ["merged"] if m in models]
    if not chain:
        return []
    sets = sorted({r["dataset"] for r in rows if r["model"] == chain[0] and "ndcg@10" in r})
    sets = [d for d in sets if all(any(r["model"] == m and r["dataset"] == d for r in rows) for m in chain)]
    avg = {m: _avg(rows, m, sets) for m in models}
    lines = [f"Average nDCG@10 over {len(sets)} retrieval sets ({', '.join(sets)}):", ""]
    lines += ["| model | avg nDCG@10 |", "|---|---|"]
    lines += [f"| {m} | {avg[m]:.4f} |" for m in sorted(models, key=lambda m: (m not in chain, m)) if avg.get(m) is not None]
    lines.append("")
    a = {m: avg.get(m) for m in chain}
    checks = []
    if s2 and all(a.get(m) is not None for m in ("base", "stage1", s2[-1])):
        checks.append(("base < stage 1 < stage 2", a["base"] < a["stage1"] < a[s2[-1]]))
    if s2 and a.get("merged") is not None and a.get(s2[-1]) is not None:
        checks.append(("merged >= stage 2 (last checkpoint)", a["merged"] >= a[s2[-1]]))
    rer = [r for r in rows if "ndcg@10_before" in r]
    if rer:
        gain = sum(r["ndcg@10"] - r["ndcg@10_before"] for r in rer) / len(rer)
        how = ""
        if all("fusion" in r for r in rer):
            alone = sum(r["ndcg@10_alone"] - r["ndcg@10_before"] for r in rer) / len(rer)
            weights = sorted({r["fusion"] for r in rer})
            chosen = [json.loads(f.read_text()) for f in sorted((out / "eval").glob("fusion_*.json"))]
            where = f" chosen on {chosen[0]['dev_file']}" if chosen else ""
            how = (f"; its score fused with the first stage's at weight {', '.join(f'{w:.1f}' for w in weights)}"
                   f"{where}; the reranker alone {alone:+.4f}")
        checks.append((f"the reranker raises nDCG@10 over its first stage on average ({gain:+.4f}{how})", gain > 0))
    lines += [f"- target {name}: **{'met' if ok else 'NOT met'}**" for name, ok in checks]
    bm25 = next((m for m in models if m.startswith("BM25")), None)
    best = chain[-1]
    if bm25:
        b = {r["dataset"]: r["ndcg@10"] for r in rows if r["model"] == bm25 and "ndcg@10" in r}
        v = {r["dataset"]: r["ndcg@10"] for r in rows if r["model"] == best and r.get("dim") is None and "ndcg@10" in r}
        below = [d for d in sets if d in b and d in v and v[d] < b[d]]
        common = [d for d in sets if d in b]
        if common:
            ours = sum(v[d] for d in common) / len(common)
            theirs = sum(b[d] for d in common) / len(common)
            verdict = "stays below" if ours < theirs else "is above"
            lines.append(f"- against BM25: the {best} model {verdict} BM25 on average ({ours:.4f} vs {theirs:.4f}); "
                         f"below it on {len(below)} of {len(common)} sets" + (f" ({', '.join(below)})" if below else ""))
    sts = [r for r in rows if "spearman" in r and r.get("dim") is None]
    if sts:
        lines.append("- STS (Spearman): " + ", ".join(f"{r['model']} {r['spearman']:.4f}" for r in sts))
    sel = out / "merged" / "merge_selection.json"
    if sel.exists():
        m = json.loads(sel.read_text())
        odds = (f", P(merge better) {m['p_merge_better']:.2f} over {m['queries']} dev queries"
                + (f", {m['confidence']:g} needed" if m.get("confidence") else "")) if "p_merge_better" in m else ""
        if m.get("fallback"):
            lines.append(f"- merge: merging did not pay on the dev pairs (best merge {m['metric']} "
                         f"{m['best_merge_score']:.4f} vs {m['score']:.4f}{odds}): 'merged' is the checkpoint "
                         f"{m['chosen']}")
        else:
            lines.append(f"- merge: kept {m['chosen']} ({m['metric']} {m['score']:.4f} on the dev pairs{odds})")
    return lines + [""]


def write_report(out: Path, cfg=None) -> Path:
    from qwen3train.eval.run import table

    out = Path(out)
    md = ["# qwen3train pipeline report", ""]
    lineage = json.loads((out / "lineage.json").read_text()) if (out / "lineage.json").exists() else {}
    if lineage:
        md += ["## Stages", "", "| stage | seconds | outputs |", "|---|---|---|"]
        md += [f"| {k} | {v['seconds']} | {', '.join(Path(p).name for p in v['outputs'])} |" for k, v in lineage.items()]
        md.append("")
    stats_path = out / "synth" / "stats.json"
    if stats_path.exists():
        s = json.loads(stats_path.read_text())
        md += ["## Stage 0: synthetic pairs", "",
               f"{s['pairs']} pairs from {s['passages']} passages (yield {s['yield_pairs_per_passage']:.2f} pairs/passage, "
               f"{s['generations']} generations, {sum(s['rejected_by_reason'].values())} rejected), generator "
               f"`{Path(s['generator']).name}` on {s['backend']}, {s['output_tokens_per_s']:.0f} output tokens/s.", "",
               f"![generation]({generation_chart(s, out)})", ""]
        if s.get("by_task_language"):
            md += ["Pairs kept and passages given up (after every retry) by task and query language "
                   f"({s.get('cross_lingual_retrieval_pairs', 0)} cross-lingual retrieval pairs):", "",
                   "| task | language | kept | gave up |", "|---|---|---|---|"]
            md += [f"| {k.split('|')[0]} | {k.split('|')[1]} | {v['kept']} | {v['gave_up']} |"
                   for k, v in s["by_task_language"].items()]
            md.append("")
        if s.get("persona_no_overlap"):
            md += [f"{s['persona_no_overlap']} passages shared no word with any persona (lexical route): their "
                   "personas were drawn per passage; an embedder that reads their language retrieves instead.", ""]
    curves = training_curves(out, ["stage1", "stage2", "rerank"])
    skipped = skipped_steps(out, ["stage1", "stage2", "rerank"])
    if curves or skipped:
        md += ["## Training", ""] + ([f"![training]({curves})", ""] if curves else []) + skipped
    md += dev_section(out, ["stage1", "stage2", "rerank"])
    fsum = out / "filter" / "summary.json"
    if fsum.exists():
        f = json.loads(fsum.read_text())
        shutil.copy(out / "filter" / "histogram.png", out / "report_filter.png")
        md += ["## Cosine filter", "", f"Kept {f['kept']} of {f['scored']} synthetic pairs with cosine > "
               f"{f['threshold']} under the stage-1 model (mean score {f['score_mean']:.3f}).", "",
               "![filter](report_filter.png)", ""]
    for folder, title in (("mine", "Hard negatives (stage 2, mined by stage 1)"),
                          ("rerank_mine", "Hard negatives (reranker, mined by the final embedder)")):
        msum = out / folder / "mine_summary.json"
        if msum.exists():
            m = json.loads(msum.read_text())
            md += [f"## {title}", "", "```", json.dumps(m, indent=1), "```", ""]
    res = out / "eval" / "results.jsonl"
    if res.exists():
        rows = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
        md += ["## Summary", ""] + summary(rows, out)
        md += ["## Evaluation", "", table(rows), "", "Per-stage nDCG@10 (full dimension):", ""] + stage_deltas(rows)
        md += ["", f"![results]({results_chart(rows, out)})", ""]
    mteb = out / "mteb" / "results.jsonl"
    if mteb.exists():
        from qwen3train.eval.mteb_eval import table as mteb_table

        md += ["## MTEB", "", mteb_table([json.loads(x) for x in mteb.read_text().splitlines() if x.strip()]), ""]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def dev_section(out: Path, stages: list[str]) -> list[str]:
    """The dev scores recorded during training (run.eval_every): one row per evaluated step, best marked."""
    md = []
    for st in stages:
        path = out / st / "dev_eval.jsonl"
        if not path.exists():
            continue
        best = json.loads((out / st / "best.json").read_text())
        metric = best["metric"]
        evals = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            evals[r["step"]] = r  # a resumed run re-evaluates a step: the latest counts
        if not md:
            md += ["## Dev evaluation during training", ""]
        md += [f"{st}: {metric} by step (best {best['score']:.4f} at step {best['step']})", "",
               "| step | " + metric + " |", "|---|---|"]
        md += [f"| {k}{' (best)' if k == best['step'] else ''} | {evals[k][metric]:.4f} |" for k in sorted(evals)]
        md.append("")
    return md
