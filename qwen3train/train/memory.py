"""Out of device memory far into a run: met in the first minute instead, and said in one line.

A step's memory follows its heaviest micro batch, and the heaviest micro batch a run's data can make may be
drawn at hour 30 (a rare long document among short ones: the data order is random). Two guards:

* **The rehearsal** (``engine.rehearse_memory``; auto: on CUDA, torch engine or ZeRO 1-3): after the run's first
  step (the optimizer's state then exists, as at every later step) one more step is run on the heaviest micro
  batch the data can make, from its largest records (their size on disk), tokenized, truncated and cut as any
  step is; its loss is made NaN, so the engine drops it as it drops any non-finite step: weights, optimizer
  moments and schedule stay as they were (DeepSpeed's step counters are put back), and the RNG is restored: the
  run then trains exactly as without it.
  If that micro batch does not fit, the run stops there, after one step, instead of at the step that would
  have drawn it.
* **The guard**: an out-of-memory error inside a step becomes one line (``errors.OutOfMemory``, status 2 from
  the command line, printed by the rank that met it) naming the step, its heaviest micro batch, the device's
  memory, the checkpoint kept, and the setting that fits: ``engine.micro_batch_tokens``. Under GradCache (and
  for the reranker) that setting does not change the loss, so the same run resumes with it
  (``identity.MEMORY_ONLY``).
"""

from __future__ import annotations

import torch

from qwen3train.errors import OutOfMemory
from qwen3train.models.fit import is_out_of_memory

GIB = 2 ** 30
MAX_ROWS = 4096  # records read for the rehearsal's token-budget micro batch, at most


def describe(mb) -> str:
    seqs = mb.sequences()
    return (f"{len(mb)} rows, {sum(map(len, seqs)):,} tokens in {len(seqs)} sequences, "
            f"the longest {max(map(len, seqs), default=0):,}")


def device_memory() -> str:
    """``; peak X of Y GiB`` on CUDA (the allocator's peak since the run began), nothing elsewhere."""
    if not torch.cuda.is_available():
        return ""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return f"; peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB allocated of {total / GIB:.1f} GiB"


def loss_keeps(cfg) -> bool:
    """Whether the loss is the same however a batch is cut into micro batches: GradCache computes it over
    the whole batch; the reranker's loss is a mean over independent groups."""
    from qwen3train.losses.rerank import RerankLossConfig

    return bool(cfg.engine.grad_cache) or isinstance(cfg.loss, RerankLossConfig)


def fix(cfg, task, mb) -> str:
    """What to set so that ``mb`` fits: a token budget half its tokens (never below its largest row, which
    a micro batch cannot split), or shorter inputs when one row alone is the micro batch."""
    units = task.unit_tokens(mb)
    tokens = sum(units)
    budget = max(tokens // 2, max(units, default=0))
    if budget >= tokens:
        return (f"one row alone ({tokens:,} tokens: a query with its positive and negatives, or a reranker group) "
                f"does not fit: lower model.max_doc_length or data.num_hard_negatives")
    keeps = ("under GradCache the loss does not depend on the micro batches" if cfg.engine.grad_cache else
             "the reranker's loss does not depend on the micro batches") if loss_keeps(cfg) else \
        ("without engine.grad_cache=true each micro batch is its own contrastive batch, so a smaller one changes "
         "the loss and the run resumes only with run.resume=force")
    return f"rerun the same command with engine.micro_batch_tokens={budget} to resume ({keeps})"


def heaviest(task, chunks: list):
    return max(chunks, key=lambda c: sum(task.unit_tokens(c)))


def out_of_memory(cfg, task, chunks: list, step: int, total: int, run_dir) -> OutOfMemory:
    """The one line for a step that ran out of device memory."""
    from qwen3train.train import checkpoint

    mb = heaviest(task, chunks)
    return OutOfMemory(f"out of {_device()} memory at step {step} of {total}, whose heaviest micro batch has "
                       f"{describe(mb)}{device_memory()}: {checkpoint.kept_line(run_dir)}; {fix(cfg, task, mb)}")


def wanted(cfg) -> bool:
    """``engine.rehearse_memory``: None (auto) rehearses on CUDA; True asks for it on any device (tests on
    the CPU). Not under DeepSpeed without ZeRO, which does not drop a non-finite step (``EngineConfig``
    refuses true there)."""
    ask = cfg.engine.rehearse_memory
    if cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 0:
        return False
    return bool(ask) if ask is not None else torch.cuda.is_available()


def rehearse(cfg, engine, task, loader, n_micro: int, world: int, step_fn) -> str | None:
    """One dropped step on the heaviest micro batch the data makes (see the module's text); returns what
    it ran, or None when no source is indexed (streamed data has no known largest records). ``step_fn`` is
    ``loop.train_step``. Every rank runs it (the same records: its collectives match)."""
    from qwen3train.train.gradcache import RngState

    budget = cfg.engine.micro_batch_tokens
    rows = min(cfg.engine.local_batch(world), MAX_ROWS) if budget else cfg.engine.micro_rows(world)
    batch = loader.heaviest(rows)
    if batch is None:
        return None
    if budget:  # the rows of one budget's worth, heaviest first: the first micro batch a step could cut
        from qwen3train.train.task import token_chunks

        batch = task.take(batch, token_chunks(task.unit_tokens(batch), budget)[0])
    what = describe(batch)
    real = task.loss

    def dropped(*a, **k):  # a NaN loss: the engine drops the step (non-finite gradients), as it drops any
        loss, stats = real(*a, **k)
        return loss * float("nan"), stats

    task.loss = dropped  # this instance only, for this step
    try:
        with RngState().replay(), engine.dropped_step():  # the RNG and the engine's counters as they were
            step_fn(engine, task, batch, 1, cfg.engine.grad_cache, budget)
    except Exception as e:  # noqa: BLE001 - only out of memory is caught (wrapped too: models/fit.py)
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(f"out of {_device()} memory in the memory rehearsal after step 1: the heaviest micro "
                          f"batch this run's data can make ({what}{device_memory()}) does not fit, and would "
                          f"stop the run at the step that draws it; {fix(cfg, task, batch)}; "
                          f"engine.rehearse_memory=false skips this check") from None
    finally:
        del task.loss
    if engine.step_applied:
        raise RuntimeError("the memory rehearsal's step was applied: its NaN gradients reached the weights")
    engine.step_applied = True
    return what


def _device() -> str:
    return "GPU" if torch.cuda.is_available() else "device"
