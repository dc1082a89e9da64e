"""LoRA trains through the loop and exports a merged model that loads in sentence-transformers;
gradient checkpointing gives the same gradients as plain backward."""

from __future__ import annotations

import torch

from helpers import make_pairs, train_cfg
from qwen3train.models.build import ModelConfig, build_embedder
from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine
from qwen3train.train.loop import run


def test_lora_run_exports_merged_weights(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg = train_cfg(tiny_model_dir, make_pairs(tmp_path / "d.jsonl"), tmp_path / "r", max_steps=3, lr=5e-3)
    cfg.model.lora.enabled = True
    cfg.model.lora.r = 4
    final = run(cfg)
    (tmp_path / "r" / "config.yaml").read_text().index("lora")  # resolved config is in the run folder
    texts = ["what is gravity?", "tensor 3 is described here"]
    base = build_embedder(ModelConfig(name_or_path=str(tiny_model_dir))).encode(texts)
    merged = build_embedder(ModelConfig(name_or_path=str(final))).encode(texts)
    st = torch.as_tensor(SentenceTransformer(str(final), device="cpu").encode(texts))
    assert (merged - st).abs().max() <= 1e-5
    assert (merged - base).abs().max() > 1e-4  # the adapters were trained and folded in


def test_gradient_checkpointing_same_gradients(tiny_model_dir, tmp_path):
    data = make_pairs(tmp_path / "d.jsonl")
    grads = []
    for ckpt in (False, True):
        cfg = train_cfg(tiny_model_dir, data, tmp_path / f"r{ckpt}")
        cfg.model.gradient_checkpointing = ckpt
        task, loader = build_task(cfg, tmp_path / f"r{ckpt}")
        task.module.train()
        engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
        batch = loader.collate_items([(i, 0) for i in range(8)], 0)
        loss, _ = task.loss(task.forward(engine, batch), batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in task.module.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
