"""Assembling finished shards: exact and normalised de-duplication, the held-out split, ``pairs.jsonl``,
``heldout.jsonl``, ``rejects.jsonl`` and ``stats.json`` (counts, rejections by reason, kept and given-up
pairs by task and language, persona matches, throughput); atomic writes shared with the shard loop."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from qwen3train.data.records import text_hash
from qwen3train.errors import private_tmp, writing
from qwen3train.synth.parse import normalize


def dedupe(rows: list[dict], seen_exact: set, seen_norm: set) -> tuple[list[dict], int]:
    out, dropped = [], 0
    for r in rows:
        ex = text_hash(r["query"] + "\u0000" + r["pos"][0])
        nm = text_hash(normalize(r["query"]) + "\u0000" + normalize(r["pos"][0]))
        if ex in seen_exact or nm in seen_norm:
            dropped += 1
            continue
        seen_exact.add(ex)
        seen_norm.add(nm)
        out.append(r)
    return out, dropped


def write_atomic(path: Path, text: str) -> None:
    tmp = private_tmp(path)
    with writing(path, tmp, kept="every finished shard is kept"):
        tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def finalize(cfg, out: Path, n_shards: int, corpus_stats: dict, n_passages: int) -> None:
    """``cfg``: the run's ``SynthConfig`` (not imported here: the pipeline imports this module)."""
    shard_dir = out / "shards"
    rows, shard_stats, rejects = [], [], []
    for k in range(n_shards):
        rows += [json.loads(x) for x in (shard_dir / f"shard_{k:05d}.jsonl").read_text(encoding="utf-8").splitlines() if x]
        shard_stats.append(json.loads((shard_dir / f"shard_{k:05d}.stats.json").read_text()))
        rejects.append((shard_dir / f"shard_{k:05d}.rejects.jsonl").read_text(encoding="utf-8"))
    code_stats = None
    if cfg.code_corpus:
        from qwen3train.synth.code import code_pairs

        code_rows, code_stats = code_pairs(cfg.code_corpus, limit=cfg.max_code_functions)
        rows += code_rows
    rows, dup = dedupe(rows, set(), set())

    def split_key(r: dict) -> str:  # both directions of one function fall on the same side
        return r["provenance"].get("source") or r["query"]

    held = [r for r in rows if (text_hash(split_key(r)) % 10_000) < cfg.heldout_fraction * 10_000]
    train = [r for r in rows if (text_hash(split_key(r)) % 10_000) >= cfg.heldout_fraction * 10_000]
    write_atomic(out / "pairs.jsonl", jsonl(train))
    write_atomic(out / "heldout.jsonl", jsonl(held))
    write_atomic(out / "rejects.jsonl", "".join(rejects))
    reasons: Counter = Counter()
    for s in shard_stats:
        reasons.update(s["rejected_by_reason"])
    count = lambda key: dict(Counter(r["provenance"].get(key, "-") for r in rows))  # noqa: E731
    by_tl: dict[str, dict[str, int]] = {}
    for r in rows:
        key = f"{r['provenance'].get('task', '-')}|{r['provenance'].get('language', '-')}"
        by_tl.setdefault(key, {"kept": 0, "gave_up": 0})["kept"] += 1
    for s in shard_stats:
        for key, n in s.get("gave_up_by_task_language", {}).items():
            by_tl.setdefault(key, {"kept": 0, "gave_up": 0})["gave_up"] += n
    cross = sum(r["provenance"].get("language") != r["provenance"].get("corpus_language") for r in rows
                if r["provenance"].get("task") == "retrieval")
    secs = sum(s["seconds"] for s in shard_stats)
    stats = {
        "passages": n_passages, "corpus": corpus_stats, "shards": n_shards,
        "pairs": len(rows), "train_pairs": len(train), "heldout_pairs": len(held), "duplicates_removed":
            dup + sum(s["duplicates"] for s in shard_stats),
        "generations": sum(s["generations"] for s in shard_stats),
        "yield_pairs_per_passage": len(rows) / max(n_passages, 1),
        "by_task": count("task"), "by_question_type": count("question_type"), "by_difficulty": count("difficulty"),
        "by_language": count("language"), "by_corpus_language": count("corpus_language"),
        "cross_lingual_retrieval_pairs": cross, "rejected_by_reason": dict(reasons),
        "persona_no_overlap": sum(s.get("persona_no_overlap", 0) for s in shard_stats),
        "by_task_language": dict(sorted(by_tl.items())), "code": code_stats,
        "prompt_tokens": sum(s["prompt_tokens"] for s in shard_stats),
        "output_tokens": sum(s["output_tokens"] for s in shard_stats), "generation_seconds": secs,
        "output_tokens_per_s": sum(s["output_tokens"] for s in shard_stats) / max(secs, 1e-9),
        "generator": cfg.generator, "backend": rows[0]["provenance"]["backend"] if rows else cfg.backend, "prompt_version": cfg.prompt_version,
        "config": asdict(cfg),
    }
    write_atomic(out / "stats.json", json.dumps(stats, indent=2))
    print(f"synth: {len(rows)} pairs ({len(held)} held out) from {n_passages} passages; "
          f"yield {stats['yield_pairs_per_passage']:.2f}; rejected {sum(reasons.values())}; -> {out / 'pairs.jsonl'}")
