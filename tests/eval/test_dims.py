"""`make eval` with Matryoshka dims: each model is loaded once and each set encoded once, every dim scored from the
same full-dimension vectors, with the rows a fresh encoder per dim gives."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from qwen3train.eval.encoder import Encoder
from qwen3train.eval.pairs import evaluate_pairs
from qwen3train.eval.retrieval import evaluate_collection
from qwen3train.eval.run import EvalConfig, dataset_name, evaluate_sts, run


def test_dims_share_one_load_and_one_encoding_per_set(tiny_model_dir, tmp_path, monkeypatch):
    """Two models, a collection, a pair file and an STS file at dims full, 16 and 32. Would catch: a model loaded
    again for each dim (the load count: 2 models x 3 dims before), a set encoded again for each dim (the encode
    count), vectors kept from one set served to another or from one model to the next (the rows differ from fresh
    encoders'), a dim not applied (rows equal across dims), rows in another order."""
    pairs, sts = tmp_path / "pairs.jsonl", tmp_path / "sts.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"what is item {i}?", "pos": [f"item {i} is a thing number {i}"]})
                             + "\n" for i in range(12)))
    sts.write_text("".join(json.dumps({"text1": f"a cat sat {i}", "text2": f"a dog sat {i % 3}", "score": i % 5})
                           + "\n" for i in range(10)))
    col = FIXTURES / "dbpedia"
    other = tmp_path / "other"  # a second model: the tiny one with other weights
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    torch.manual_seed(0)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    models = {"a": str(tiny_model_dir), "b": str(other)}

    loads, encodes = [], []
    real_init, real_encode = Encoder.__init__, Encoder._encode_full

    def init(self, path, **kw):
        loads.append(str(path))
        real_init(self, path, **kw)

    def encode(self, texts, instruction=None):
        encodes.append((str(self.path), len(texts), instruction))
        return real_encode(self, texts, instruction)

    monkeypatch.setattr(Encoder, "__init__", init)
    monkeypatch.setattr(Encoder, "_encode_full", encode)
    rows = run(EvalConfig(models=models, collections=[str(col)], pairs=[str(pairs)], sts=[str(sts)], dims=[16, 32],
                          output_dir=str(tmp_path / "out"), cache_dir=None, max_length=64, update_cards=False))
    assert loads == [models["a"], models["b"]]
    # per model: the collection's queries and documents, the pairs' queries and documents, the STS texts: once
    assert len(encodes) == 2 * 5, encodes
    monkeypatch.setattr(Encoder, "__init__", real_init)
    monkeypatch.setattr(Encoder, "_encode_full", real_encode)

    want = []
    for label, path in models.items():
        for dim in (None, 16, 32):
            enc = Encoder(path, max_length=64, dim=dim)
            r = evaluate_collection(path, col, encoder=enc, dim=dim)
            want.append({"model": label, "dataset": r["dataset"], "dim": dim,
                         **{k: r[k] for k in ("ndcg@10", "recall@100", "mrr@10", "queries")}})
            want.append({"model": label, "dataset": dataset_name(pairs), "dim": dim, **evaluate_pairs(path, pairs, encoder=enc)})
            want.append({"model": label, "dataset": dataset_name(sts), "dim": dim, **evaluate_sts(enc, sts)})
    assert [(r["model"], r["dataset"], r["dim"]) for r in rows] == [(r["model"], r["dataset"], r["dim"]) for r in want]
    for got, ref in zip(rows, want):
        for k, v in ref.items():
            assert got[k] == v if not isinstance(v, float) else abs(got[k] - v) < 1e-6, (got, ref, k)
    full = {(r["model"], r["dataset"]): r for r in rows if r["dim"] is None}
    assert any(r["ndcg@10"] != full[(r["model"], r["dataset"])]["ndcg@10"] for r in rows
               if r["dim"] == 16 and "ndcg@10" in r)
