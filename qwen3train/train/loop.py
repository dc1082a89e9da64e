"""The one training loop, for stage 1, stage 2 (and the reranker): the stage is data and
hyper-parameters, not code.

    make stage1 ARGS="..."   ->  cli/train.py  ->  run(cfg)
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from qwen3train import dist
from qwen3train.errors import StoppedBySignal, TrainingDiverged
from qwen3train.models.fit import is_out_of_memory
from qwen3train.precision import resolve_train_precision
from qwen3train.stall import StallReport
from qwen3train.train import checkpoint, identity, memory, preempt
from qwen3train.train.checkpoint import TrainState
from qwen3train.train.deepspeed_engine import DeepSpeedEngine, before_process_group
from qwen3train.train.engine import TorchEngine
from qwen3train.train.fsdp_engine import FSDPEngine
from qwen3train.train.gradcache import grad_cache_step
from qwen3train.train.task import token_chunks
from qwen3train.train.telemetry import Telemetry


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cut_micro_batches(task, batch, n_micro: int, token_budget: int | None = None, n: int | None = None) -> list:
    """This rank's share of a global batch cut into micro batches, locally: ``n_micro`` equal row slices, or
    (``engine.micro_batch_tokens``) consecutive units of at most ``token_budget`` tokens, ``n`` of them
    (``token_chunks``; None: as few as the budget allows)."""
    if not token_budget:
        return task.split(batch, n_micro)
    return [task.take(batch, c) for c in token_chunks(task.unit_tokens(batch), token_budget, n)]


def prepare_batch(task, n_micro: int, token_budget: int | None = None):
    """What the data thread does to each batch ahead of its step (``Loader.ahead``): cut its micro batches
    and pack each (``task.pack``), kept on the batch (``batch.micro``) for ``micro_batches``. No collective."""
    def prepare(batch) -> None:
        chunks = cut_micro_batches(task, batch, n_micro, token_budget)
        for mb in chunks:
            task.pack(mb)
        batch.micro = ((n_micro, token_budget), chunks)
    return prepare


def micro_batches(task, batch, n_micro: int, token_budget: int | None = None) -> list:
    """The micro batches of ``cut_micro_batches``, the ones ``prepare_batch`` made when they fit. With a token
    budget every rank runs as many micro steps as the rank that needs most (one small collective): ZeRO-2/3
    reduce gradients at each backward, so the counts must agree; a rank that needs fewer cuts again."""
    made = batch.micro[1] if batch.micro is not None and batch.micro[0] == (n_micro, token_budget) else None
    if not token_budget:
        return made if made is not None else cut_micro_batches(task, batch, n_micro)
    n = dist.max_int(len(made) if made is not None else len(token_chunks(task.unit_tokens(batch), token_budget)))
    if made is not None and len(made) == n:
        return made
    return cut_micro_batches(task, batch, n_micro, token_budget, n)


def train_step(engine, task, batch, n_micro: int, grad_cache: bool, token_budget: int | None = None):
    """forward -> loss -> backward over the micro steps, then one optimizer step. The losses' statistics
    stay on the device until the step is done and are read then, all at once: no micro step waits for
    the GPU between its forward and its backward."""
    chunks = micro_batches(task, batch, n_micro, token_budget)
    if grad_cache and task.whole_batch_loss:  # one loss over the whole batch, backward chunk by chunk
        loss, stats = grad_cache_step(engine, task, batch, chunks)
    else:  # each micro batch is its own contrastive batch; gradients accumulate, weighted by rows
        loss, per = 0.0, []
        for i, mb in enumerate(chunks):
            with engine.micro(last=i == len(chunks) - 1):
                mb_loss, stats = task.loss(task.forward(engine, mb), mb)
                engine.backward(mb_loss * (len(mb) / len(batch)))
            loss = loss + mb_loss.detach() * (len(mb) / len(batch))
            per.append(stats)
        stats = {k: torch.nanmean(torch.stack([torch.as_tensor(s[k], dtype=torch.float32) for s in per]))
                 for k in per[0]}
    grad_norm = engine.step()
    return loss, read_stats(stats), grad_norm


def skip_step(cfg, run_dir: Path, step: int, batch, loss: float, grad_norm: float, in_a_row: int,
              applied: bool) -> None:
    """A step whose loss or gradients are not finite. Its records (every rank's share) go to
    ``<run>/skipped_steps.jsonl``; then the run goes on (the engine dropped the update) or, past
    ``run.skip_nonfinite_steps`` in a row or when an update was applied anyway, stops: ``TrainingDiverged``."""
    rows = [{"record": int(rid), "task": rec.task, "query": rec.query, "pos": rec.pos[j]}
            for rid, rec, j in (getattr(batch, "records", None) or [])]
    rows = [r for part in dist.all_gather_object(rows) for r in part]  # collective: every rank is here
    path = run_dir / "skipped_steps.jsonl"
    if dist.is_main():
        def num(x: float):
            return x if math.isfinite(x) else str(x)

        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "loss": num(loss), "grad_norm": num(grad_norm), "update_applied": applied,
                                "records": rows}, ensure_ascii=False) + "\n")
    limit = cfg.run.skip_nonfinite_steps
    what = f"non-finite loss ({loss:g}) or gradients (norm {grad_norm:g}) at step {step}"
    if applied or in_a_row > limit:
        why = ("the engine applied its update" if applied else
               f"{in_a_row} step(s) in a row, more than run.skip_nonfinite_steps={limit}")
        checkpoint.settle(run_dir, collective=True)  # every rank is here
        last = checkpoint.latest_checkpoint(run_dir)
        raise TrainingDiverged(f"{what}: {why}; stopping. The last good checkpoint is "
                               f"{last or 'none yet (a rerun starts over)'}; the step's records are in {path}; "
                               f"lower optim.lr or check the data.")
    print0(f"warning: {what}: update skipped ({in_a_row} in a row, at most {limit}); its {len(rows)} records "
           f"are in {path}")


def read_stats(stats: dict) -> dict[str, float]:
    """A step's statistics (0-d tensors on the loss's device, or numbers) as floats, in one transfer."""
    if not stats:
        return {}
    dev = next((v.device for v in stats.values() if torch.is_tensor(v)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dev) for v in stats.values()])
    return dict(zip(stats, values.tolist()))


def write_card(cfg, run_dir: Path, model_dir: Path, step: int) -> None:
    """The export's model card: the lineage of the export this run started from, then this stage."""
    from qwen3train.models.card import inherited, set_card, stage_entry

    base, lineage = inherited(cfg.model.init_from) if cfg.model.init_from else (cfg.model.name_or_path, [])
    entry = stage_entry(cfg, json.loads((run_dir / "data_summary.json").read_text()))
    entry["steps"] = step
    set_card(model_dir, base_model=base, lineage=lineage + [entry], license=cfg.export.license)


def run(cfg, hooks=None) -> Path:
    """Train as configured; returns the exported final model folder.

    ``hooks``: optional callable ``hooks(step)`` after every optimizer step (tests use it to
    simulate a crash).
    """
    from qwen3train.train.build import build_task

    before_process_group()
    dist.init()
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.output_dir)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    cfg.engine.micro_steps(dist.world_size())  # a batch split that does not divide: one line before the model loads
    cfg.engine.hybrid_shard(dist.world_size())  # likewise an FSDP shard size
    if cfg.export.push_to_hub:  # every rank: a mistake they all meet, printed once, before anything is trained
        from qwen3train.models.card import check_hub_token

        check_hub_token(cfg.export.push_to_hub)

    precision = resolve_train_precision(cfg.engine.precision, cfg.model.dtype)
    print0(f"compute precision {precision} (engine.precision={cfg.engine.precision}, model.dtype={cfg.model.dtype}); "
           f"trainable weights and optimizer state float32, exports {cfg.model.dtype}")
    task, batches = build_task(cfg, run_dir, precision)
    if cfg.engine.grad_cache and not task.whole_batch_loss:
        print0("note: engine.grad_cache=true is not needed here: the reranker's loss is a mean over independent query "
               "groups, so the micro batches' accumulated gradients are the whole batch's already (GradCache would "
               "only add a second forward); trained without it")
    if cfg.run.resume != "never":  # a run resumes with the batch plans it began with (data/batching.py)
        batches.use_plan_version(checkpoint.plan_version(run_dir, batches.plan_version))
    batches.check()  # an indexed source that makes no global batch is an error now, not mid-run
    total = cfg.run.max_steps if cfg.run.max_steps > 0 else cfg.run.epochs * batches.steps_per_epoch()
    make = {"deepspeed": DeepSpeedEngine, "fsdp": FSDPEngine}.get(cfg.engine.backend, TorchEngine)
    engine = make(task.module, cfg.engine, cfg.optim, total, precision)
    ended = False
    try:
        final_dir = train(cfg, task, batches, engine, total, hooks)
        ended = True
    finally:
        engine.close(ended)  # what holds the process groups goes before the interpreter's teardown (deepspeed_engine.py)
    print0(f"done: {total} steps; final model at {final_dir}")
    return final_dir


def train(cfg, task, batches, engine, total: int, hooks=None) -> Path:
    """``run``'s training with its engine built: resume, the steps, checkpoints, dev evaluation, the export."""
    from qwen3train.train.build import flops_per_token

    run_dir = Path(cfg.run.output_dir)
    final_dir = run_dir / "final"
    world = dist.world_size()
    n_micro = cfg.engine.micro_steps(world)
    state = TrainState(plan=batches.plan_version)
    finished = None  # an export-only last checkpoint at the end: training is done, only the final copy is left
    if cfg.run.resume != "never":
        finished = dist.broadcast_object(checkpoint.finished_point(run_dir, total) if dist.is_main() else None)
    last = checkpoint.resume_point(run_dir) if cfg.run.resume != "never" and finished is None else None
    if finished is not None:
        identity.check_resume(run_dir, cfg, cfg.run.resume)
        state = TrainState(**json.loads((finished / "train_state.json").read_text()))
        print0(f"{finished} is the run's last step (export only): training was done; writing the final model")
    elif last is not None:
        identity.check_resume(run_dir, cfg, cfg.run.resume)
        state = checkpoint.load(last, engine)
        print0(f"resumed from {last} (step {state.step})")
    checkpoint.clear_partial(run_dir)  # rank 0: saves cut short by a kill or an error, left as .tmp folders
    fingerprint = batches.fingerprint()  # what the batch plans follow from: resumed only on the same data
    if finished is None and last is not None:
        identity.check_data(run_dir, fingerprint, cfg.run.resume, state.step)
    batches.seek({"step": state.step, "cursors": state.cursors, "epoch": state.epoch,
                  "batch_in_epoch": state.batch_in_epoch})
    if dist.is_main():
        identity.write_data(run_dir, fingerprint)
        write_resolved_config(cfg, run_dir / "config.yaml")
        (run_dir / "run_meta.json").write_text(json.dumps(identity.meta(cfg), indent=2))
        if getattr(engine, "ds_config", None) is not None:  # what DeepSpeed ran with (derived + the user's file)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(engine.ds_config, indent=2))
        summary = [{**s.source.summary(), "weight": s.weight, "plan": s.stats} for s in batches.streams]
        (run_dir / "data_summary.json").write_text(json.dumps(summary[0] if len(summary) == 1 else summary, indent=2))
        for source in (s.source for s in batches.streams):
            if source.rejected:
                print0(f"skipped {sum(source.rejected.values())} bad records: {dict(source.rejected)} "
                       f"(kept in {source.rejects_path})")
        for line in batches.left_out() if state.step == 0 else []:
            print0(line)
    dev = None
    if cfg.run.eval_every > 0:
        from qwen3train.train import dev_eval

        dev = dev_eval.DevEval(cfg.run.eval_file, task, cfg.run.eval_metric)

    def best_kept() -> tuple[int, ...]:  # the best step by dev score survives the pruning (rank 0 prunes)
        return (dev_eval.best_step(run_dir) or 0,) if dev is not None and dist.is_main() else ()

    def evaluate(saved: bool) -> dict:  # the dev scores of state.step, recorded (rank 0) and printed
        scores = dev.at_step(run_dir, state.step)
        if dist.is_main():
            ckpt = str(checkpoint.step_dir(run_dir, state.step)) if saved else None
            best = dev_eval.record(run_dir, state.step, scores, cfg.run.eval_metric, ckpt)
            print0(f"dev {cfg.run.eval_metric} {scores[cfg.run.eval_metric]:.4f} at step {state.step} "
                   f"(best {best['score']:.4f} at step {best['step']})")
        return {f"dev_{k}": v for k, v in scores.items()}

    if dev is not None and last is not None and dev_eval.missed(run_dir, state.step, cfg.run.eval_every, total):
        evaluate(True)  # stopped after this checkpoint's save, before its evaluation (or by SIGTERM): now

    tel = Telemetry(run_dir, total, state.step, use_wandb=cfg.run.wandb, project=cfg.run.wandb_project,
                    run_name=cfg.run.name, config=asdict(cfg), flops_per_token=flops_per_token(task.module),
                    config_hash=identity.config_hash(cfg))
    # this rank's share of each global batch, the next one made on the data thread during the step
    ahead = batches.ahead(0 if finished else max(0, total - state.step), depth=cfg.data.prefetch,
                          prepare=prepare_batch(task, n_micro, cfg.engine.micro_batch_tokens))
    waited, in_a_row = 0.0, 0  # in_a_row: steps skipped in a row (non-finite gradients)
    rehearse = memory.wanted(cfg)  # after this process's first step (train/memory.py)
    stop = preempt.StopSignal().install()  # SIGTERM: finish the step, save, stop (train/preempt.py)
    stall = StallReport(cfg.run.stall_report_s, dist.rank())  # no progress for long: where it stands
    stall.phase(f"step {state.step + 1}")
    first_step = state.step + 1
    pending = None  # a save whose files a thread is writing (run.save_in_background; train/background.py)
    in_background = torch.cuda.is_available() if cfg.run.save_in_background is None else cfg.run.save_in_background

    def finish_save() -> None:  # collective: the save in flight moved into place, once every rank's writer is done
        nonlocal pending
        done, pending = pending, None
        checkpoint.IN_FLIGHT.pop(str(run_dir), None)
        path = done.finish(cfg.run.keep_last, cfg.run.keep_every, best_kept())
        if done.export and dist.is_main():
            write_card(cfg, run_dir, path / "model", done.step)

    try:
        for batch in ahead:
            try:
                loss, stats, grad_norm = train_step(engine, task, batch, n_micro, cfg.engine.grad_cache,
                                                    cfg.engine.micro_batch_tokens)
            except Exception as e:  # out of memory (compiled code may wrap it): one line naming the step,
                if not is_out_of_memory(e):  # its micro batch and what fits; anything else is re-raised
                    raise
                raise memory.out_of_memory(cfg, task, cut_micro_batches(task, batch, n_micro,
                                                                        cfg.engine.micro_batch_tokens),
                                           state.step + 1, total, run_dir) from None
            ahead.settle()  # the data thread is idle from here to the next batch: evaluation and exports tokenize
            data_wait, waited = ahead.wait_s - waited, ahead.wait_s
            state.step += 1
            state.epoch, state.batch_in_epoch = batches.epoch, batches.position
            state.samples += cfg.engine.global_batch_size
            state.world_size = world
            keys = sorted(stats)  # one collective for everything logged (dist.py puts it on the right device)
            writing = float(pending is not None and pending.busy())
            loss_all, tokens, signalled, writing, *stat_vals = dist.mean_floats(
                [loss.float().item(), batch.num_tokens, stop.signum, writing, *(stats[k] for k in keys)])
            tokens *= world
            metrics = {"loss": loss_all, "lr": engine.lr(), "grad_norm": grad_norm, "epoch": state.epoch,
                       **dict(zip(keys, stat_vals)), "data_wait_s": data_wait,  # + the share of ranks whose writer
                       **({"checkpoint_writing": writing} if pending is not None else {})}  # was busy after the step
            if metrics.get("kd_rows") == 0 and state.step == first_step and dist.is_main():  # distillation of nothing
                print("warning: loss.kd_weight > 0 but no row of the first batch has a teacher's scores (pos_scores, "
                      "neg_scores: make score writes them); rows without them train on InfoNCE alone", flush=True)
            if engine.step_applied and math.isfinite(loss_all):
                in_a_row = 0
            else:  # every rank takes this branch: the loss is the ranks' mean, the norm a global one
                in_a_row += 1
                metrics["skipped"] = int(not engine.step_applied)
                skip_step(cfg, run_dir, state.step, batch, loss_all, grad_norm, in_a_row, engine.step_applied)
            stopping = signalled > 0 and state.step < total  # some rank got SIGTERM: every rank stops here
            saving = (stopping or cfg.run.save_every > 0 and state.step % cfg.run.save_every == 0) and state.step < total
            if pending is not None and (writing == 0 or saving):  # every rank's writer done, or a save waits for it
                finish_save()
            if saving:  # before the dev evaluation: a step is kept whatever the evaluation meets
                stall.phase(f"the save of step {state.step}")
                state.cursors = batches.state()["cursors"]  # collective with streamed sources: all ranks
                pending = checkpoint.begin(run_dir, state, engine, task, export_model=cfg.run.export_checkpoints,
                                           background=in_background and not stopping)
                if not pending.writer.background:
                    finish_save()
                else:  # an error met before its finish names it as the last checkpoint (checkpoint.settle)
                    checkpoint.IN_FLIGHT[str(run_dir)] = finish_save
            if dev is not None and not stopping and (state.step % cfg.run.eval_every == 0 or state.step == total):
                stall.phase(f"the dev evaluation of step {state.step}")
                metrics.update(evaluate(saving or state.step == total))
            tel.log(state.step, metrics, cfg.engine.global_batch_size, int(tokens))
            if stopping:
                signum = int(dist.max_int(stop.signum))  # the signal itself, from a rank that got it
                raise StoppedBySignal(f"{preempt.STOPPED}{preempt.name(signum)} after step {state.step} of {total}: "
                                      f"checkpoint {checkpoint.step_dir(run_dir, state.step)} saved; rerun the same "
                                      f"command to resume", signum)
            if rehearse and state.step < total:  # after this process's first step, logged (train/memory.py)
                rehearse = False
                stall.phase("the memory rehearsal")
                what = memory.rehearse(cfg, engine, task, batches, n_micro, world, train_step)
                print0(f"memory rehearsal: the heaviest micro batch of the data ({what}{memory.device_memory()}) "
                       f"fits" if what else "memory rehearsal: skipped (streamed sources: no known largest records)")
                tel.reset_clock()
            stall.phase(f"step {state.step + 1}")
            if hooks is not None:
                hooks(state.step)
        stall.phase("the final save and export")
        if pending is not None:
            finish_save()
        if finished is None:
            state.cursors = batches.state()["cursors"]
            checkpoint.save(run_dir, state, engine, task, export_model=True, keep_last=cfg.run.keep_last,
                            keep_every=cfg.run.keep_every, keep_steps=best_kept(),
                            engine_state=cfg.run.final_engine_state)
        if dist.is_main():
            src = checkpoint.step_dir(run_dir, state.step) / "model"
            write_card(cfg, run_dir, src, state.step)
            tmp = final_dir.with_name(".final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, copy_function=_link_weights)
            shutil.rmtree(final_dir, ignore_errors=True)
            tmp.rename(final_dir)
            if cfg.export.push_to_hub:
                from qwen3train.models.card import upload_final

                print0(upload_final(final_dir, cfg.export.push_to_hub, cfg.export.hub_private))
        dist.barrier()
    finally:
        if pending is not None and world == 1:  # an error ends the run: the save in flight is still made whole
            step = pending.step  # (with peers the collective finish cannot be had: its .tmp folder is left, as a kill)
            try:
                finish_save()
            except Exception as e:  # noqa: BLE001 - the run's own error is the one reported
                print(f"note: the checkpoint of step {step} could not be finished ({e})", flush=True)
        checkpoint.IN_FLIGHT.pop(str(run_dir), None)
        stall.close()
        stop.restore()
        ahead.close()
        tel.close()
    return final_dir


def _link_weights(src: str, dst: str) -> None:
    """The final model from the last checkpoint's export: weight files hard-linked (written once, never
    changed in place: ~2 s a GB saved), the rest (cards, which evaluation rewrites) copied; a copy where the
    file system has no links."""
    if src.endswith((".safetensors", ".bin", ".gguf")):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def write_resolved_config(cfg, path: Path) -> None:
    """The exact configuration of the run, so every checkpoint can be traced to it."""
    from omegaconf import OmegaConf

    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)


def print0(msg: str) -> None:
    if dist.is_main():
        print(msg, flush=True)
