"""Run under torchrun (2 gloo processes): one step's gradients through DDP, plain and GradCache."""

from __future__ import annotations

import sys

import torch

from qwen3train import dist
from qwen3train.train.build import build_task
from qwen3train.train.engine import TorchEngine
from qwen3train.train.gradcache import grad_cache_step

sys.path.insert(0, sys.argv[1])
from helpers import rerank_cfg, train_cfg  # noqa: E402


def main(tests_dir, model_dir, data_file, out_file):
    dist.init()
    cfg = train_cfg(model_dir, data_file, out_file + ".run", k=2, global_batch=8, micro=2, kd_weight=0.5,
                    hardness=2.0)
    task, loader = build_task(cfg, cfg.run.output_dir)
    engine = TorchEngine(task.module, cfg.engine, cfg.optim, 10)
    r, w = dist.rank(), dist.world_size()
    local = 8 // w
    items = [(i, 0) for i in range(8)][r * local:(r + 1) * local]
    batch = loader.collate_items(items, 0)
    result = {}
    # plain: the whole local batch in one micro step (negatives = the 8 gathered rows)
    engine.optimizer.zero_grad()
    with engine.micro(last=True):
        loss, _ = task.loss(task.forward(engine, batch), batch)
        engine.backward(loss)
    result["plain"] = (dist.all_reduce_mean(loss).item(),
                       {n: p.grad.clone() for n, p in engine.module.named_parameters()})
    # GradCache: 2 chunks per rank, DDP sync only on the last
    engine.optimizer.zero_grad()
    loss, _ = grad_cache_step(engine, task, batch, task.split(batch, 2))
    result["gradcache"] = (dist.all_reduce_mean(loss).item(),
                           {n: p.grad.clone() for n, p in engine.module.named_parameters()})
    # reranker (sft loss, groups of 4): 2 queries per rank
    rcfg = rerank_cfg(model_dir, data_file, out_file + ".rr", global_batch=4, micro=2, kd_weight=0.5)
    rtask, rloader = build_task(rcfg, rcfg.run.output_dir)
    rengine = TorchEngine(rtask.module, rcfg.engine, rcfg.optim, 10)
    rbatch = rloader.collate_items([(i, 0) for i in range(4)][r * 2:(r + 1) * 2], 0)
    rengine.optimizer.zero_grad()
    with rengine.micro(last=True):
        loss, _ = rtask.loss(rtask.forward(rengine, rbatch), rbatch)
        rengine.backward(loss)
    result["rerank"] = (dist.all_reduce_mean(loss).item(),
                        {n: p.grad.clone() for n, p in rengine.module.named_parameters() if p.grad is not None})
    if dist.is_main():
        torch.save(result, out_file)
    dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:5])
