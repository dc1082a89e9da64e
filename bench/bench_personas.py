"""Persona retrieval at Persona Hub scale: top-5 personas for every passage, lexical index (and the
embedder route with --embedder), wall time and peak memory.

    .venv/bin/python bench/bench_personas.py --personas 200000 --passages 100000 [--embedder MODEL]
        [--max-length 128] [--precision auto]   (the embedder route's defaults, as synth.persona_*)

Personas and passages are built from the real texts the project already has (the shipped personas and
the stage-0 demo corpus: stdlib docstrings), recombined to reach the size: persona i is shipped persona
i mod 60 with the words of one docstring summary appended, so the vocabulary and the overlap between
personas and passages are those of real text, not of random words. Peak memory is the process's
maximum RSS (resource.getrusage), measured in a fresh process per retriever.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def texts(n_personas: int, n_passages: int) -> tuple[list[str], list[str]]:
    from qwen3train.data.demo import docstring_pairs
    from qwen3train.synth.personas import DEFAULT_PERSONAS, load_personas

    pairs = docstring_pairs()
    base = load_personas(DEFAULT_PERSONAS)
    personas = [f"{base[i % len(base)]} interested in {pairs[i % len(pairs)]['query'][:80]}" for i in range(n_personas)]
    docs = [p["pos"][0] for p in pairs]
    passages = [docs[i % len(docs)] + ("" if i < len(docs) else f" (variant {i // len(docs)})") for i in range(n_passages)]
    return personas, passages


def one(kind: str, n_personas: int, n_passages: int, model: str | None, out: str, max_length: int = 128,
        precision: str = "auto") -> None:
    from qwen3train.synth.personas import EmbedderIndex, LexicalIndex

    personas, passages = texts(n_personas, n_passages)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if kind == "lexical":
        index = LexicalIndex(personas)
    else:
        index = EmbedderIndex(personas, model, cache_dir=None, max_length=max_length, precision=precision)
    t_index = time.perf_counter() - t
    print(json.dumps({"retriever": kind, "index_s": round(t_index, 1), "personas": n_personas,
                      "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)
    t = time.perf_counter()
    top = index.topk(passages, 5)
    t_search = time.perf_counter() - t
    Path(out).write_text(json.dumps({
        "retriever": kind, **({"max_length": max_length, "precision": precision} if kind == "embedder" else {}),
        "personas": n_personas, "passages": n_passages, "index_s": round(t_index, 1),
        "search_s": round(t_search, 1), "passages_per_s": round(n_passages / t_search),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_after_texts_mib": round(rss0), "first": top[0]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--personas", type=int, default=200_000)
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--embedder", default=None)
    ap.add_argument("--max-length", type=int, default=128, help="embedder route: tokens read per text")
    ap.add_argument("--precision", default="auto", help="embedder route: auto, float32, bfloat16")
    ap.add_argument("--role", nargs=7, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role:
        kind, n_p, n_q, model, out, max_length, precision = a.role
        return one(kind, int(n_p), int(n_q), None if model == "-" else model, out, int(max_length), precision)
    results = []
    for kind in ["lexical"] + (["embedder"] if a.embedder else []):
        out = Path(f"/tmp/bench_personas_{kind}.json")
        subprocess.run([sys.executable, __file__, "--role", kind, str(a.personas), str(a.passages),
                        a.embedder or "-", str(out), str(a.max_length), a.precision], check=True, cwd=REPO)
        results.append(json.loads(out.read_text()))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
