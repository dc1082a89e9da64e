"""GradCache (Gao et al., 2021): the loss over a batch far larger than fits in memory.

1. embed every chunk without a graph (recording the RNG state of each chunk);
2. compute the loss on the cached representations and back-propagate to them only;
3. re-embed each chunk with a graph, replaying its RNG state, and back-propagate
   ``sum(rep * cached_grad)``: by the chain rule the parameters receive exactly the gradient of the
   full-batch loss, while activations of a single chunk are alive at a time.

Works under DDP (``engine.micro`` suppresses the all-reduce until the last chunk) and DeepSpeed
ZeRO-1/2/3 (one ``engine.backward`` per chunk within one accumulation window, unscaled), the
combination where other implementations fail.
"""

from __future__ import annotations

import contextlib

import torch


class RngState:
    """CPU (and current CUDA device) RNG state, to replay a chunk's dropout exactly."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def replay(self):
        cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        try:
            yield
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)


def grad_cache_step(engine, task, batch, chunks: list):
    """One optimizer step's worth of backward passes over ``chunks`` (the batch's micro batches, cut
    by rows or by tokens: ``train.loop.micro_batches``); returns (loss, stats) of the whole batch."""
    n_chunks = len(chunks)
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState())
            reps = task.forward(engine, chunk)
            cached.append(tuple(None if r is None else r.detach().requires_grad_() for r in reps))
    loss, stats = task.loss(task.join(cached), batch)
    loss.backward()  # the graph holds only the cached leaves (and the cross-rank gather)
    for i, (chunk, leaves, state) in enumerate(zip(chunks, cached, states)):
        with engine.micro(last=i == n_chunks - 1), state.replay():
            reps = task.forward(engine, chunk)
            surrogate = sum((r * leaf.grad).sum() for r, leaf in zip(reps, leaves) if r is not None)
            engine.backward(surrogate)
    return loss.detach(), stats
