"""The DeepSpeed engine (ZeRO-1/2/3): the only module that imports deepspeed, and only when
``engine.backend=deepspeed`` (or, at start-up, where it is installed: ``before_process_group``). It implements
``train.engine.Engine``; the DeepSpeed JSON config it hands over is made in ``train.ds_config``, a checkpoint of
another process count is resharded by ``train.reshard``."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import torch
from torch import nn

from qwen3train import dist
from qwen3train.train.ds_config import deepspeed_config, offloads_optimizer
from qwen3train.models.export import retie
from qwen3train.train.engine import EngineConfig, check_written_by, host_peak_mb, report_load
from qwen3train.train.schedule import OptimConfig, build_optimizer


class DeepSpeedEngine:
    """DeepSpeed ZeRO-1/2/3 with a config generated from EngineConfig (merged with the user's JSON).

    The optimizer is handed in: torch AdamW, or DeepSpeed's CPU Adam under ZeRO-Offload (DeepSpeed
    refuses a client torch optimizer there). ``gradient_accumulation_steps`` = micro steps per
    optimizer step, so DeepSpeed reduces gradients and steps exactly at our boundary; losses reach
    ``backward`` already scaled (``scale_wrt_gas=False``), which is what GradCache needs."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int,
                 precision: str = "fp32") -> None:
        deepspeed = _deepspeed()
        self.cfg = cfg
        self.precision = precision
        world = dist.world_size()
        self.gas = cfg.micro_steps(world)
        self.ds_config = deepspeed_config(cfg, world, precision)
        make = None
        if offloads_optimizer(self.ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            def make(groups, lr, betas, eps):
                return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
        opt, sched = build_optimizer(model.named_parameters(), optim, total_steps, make=make, drop_empty=True)
        partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # built under zero.Init (Zero3Build)
        built_mb = host_peak_mb()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config)
        self._zero3 = cfg.zero_stage == 3
        if self._zero3 and world > 1:
            report_load("engine=zero3", partitioned, "the model was built partitioned over the {ranks} ranks "
                        "(zero.Init) and rank 0 alone read the weights", "each of the {ranks} ranks loaded the whole "
                        "model before it was partitioned (engine.zero3_init=false)", built_mb)
        self._deepspeed = deepspeed
        self.step_applied = True

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, **batch):
        return self.engine(**batch)  # DeepSpeed applies the torch_autocast section here

    @contextlib.contextmanager
    def micro(self, last: bool):
        """The accumulation boundary is set for each micro-step (``last``), not counted from the
        configured accumulation steps: token-budget micro batches vary in number from step to step.
        A micro-step that is not the last ends with DeepSpeed's ``step()``, which off the boundary
        only advances its counter (no optimizer step). The boundary's call is ``step``."""
        self.engine.set_gradient_accumulation_boundary(last)
        yield
        if not last:
            self.engine.step()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """The optimizer step at the accumulation boundary (reduce, clip, update, schedule)."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called before the last micro-step of the batch")
        self.engine.step()
        # ZeRO-1/2/3 drop a step whose gradients' norm is not finite (no update, no schedule step)
        self.step_applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @contextlib.contextmanager
    def dropped_step(self):
        """DeepSpeed counts a dropped (overflowed) step in its own counters: they are put back, so the
        memory rehearsal's step leaves no trace (the weights, moments and schedule it leaves alone itself)."""
        keys = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
        saved = {k: getattr(self.engine, k) for k in keys if hasattr(self.engine, k)}
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self.engine, k, v)

    def save(self, path: Path, writer) -> None:
        """DeepSpeed's checkpoint (collective). Under a background writer its files go through ``_Queued``: each
        state dict DeepSpeed hands its checkpoint engine is copied to host memory now and written by the writer."""
        if not writer.background:
            self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)
            return
        own = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = _Queued(own, writer)
        try:
            self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)
        finally:
            self.engine.checkpoint_engine = own

    def load(self, path: Path, saved_world: int | None = None) -> None:
        """ZeRO partitions the weights' fp32 copy and the optimizer's moments by rank: a checkpoint written by
        another process count is first made whole (``_load_resharded``)."""
        check_written_by(path, "deepspeed")
        world = dist.world_size()
        if saved_world is not None and saved_world != world and self.cfg.zero_stage > 0:
            self._load_resharded(path, saved_world, world)
            return
        self.engine.load_checkpoint(str(path), tag="deepspeed")

    def _load_resharded(self, path: Path, saved_world: int, world: int) -> None:
        """A ZeRO checkpoint of ``saved_world`` ranks resumed on ``world`` (train/reshard.py): converted into
        DeepSpeed's universal form by rank 0, beside the checkpoints, then each rank loads its slice."""
        from qwen3train.train import reshard

        out = path.parent.parent / f".resharded-{path.parent.name}"
        if dist.is_main():
            print(f"note: {path.parent} was written by {saved_world} processes; resharding its ZeRO-"
                  f"{self.cfg.zero_stage} state for {world} (DeepSpeed's universal checkpoint, in {out})", flush=True)
        failure = (f"resume with NGPU={saved_world} (x nodes), or start a new run from its weights with "
                   f"model.init_from={path.parent / 'model'} run.output_dir=<new folder>")
        universal, seconds = reshard.to_universal(path / "deepspeed", out, failure)
        config = self.engine._config
        own = reshard.hyperparameters(self.optimizer)
        config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            config.load_universal_checkpoint = False
        reshard.repair(self.optimizer, own)
        if dist.is_main():
            print(f"note: resharded in {seconds:.0f} s; the run goes on from step "
                  f"{path.parent.name.split('_')[1].lstrip('0') or 0} on {world} process{'es' * (world > 1)}", flush=True)
        reshard.remove(out)

    def close(self, ended: bool) -> None:
        """DeepSpeed's objects hold the run's process groups to the end of the process: ZeRO-3 keeps the model in a
        module-level stack (``parameter_offload.FWD_MODULE_STACK``) that nothing empties, its parameters name their
        group, and DeepSpeed keeps a clone of the world group in ``deepspeed.utils.groups``. Held, the groups' gloo
        threads end in the interpreter's teardown, where a rank can abort after its work is done (SIGABRT: a 2-rank
        ZeRO-3 run in a CI simulation). Here the hooks go (``destroy``), the model leaves the stack, a class-level
        cache keyed by the model's parts is emptied and, when the run ``ended`` without an error, DeepSpeed's clone
        of the world group is destroyed and released (after an error a peer may be gone: DeepSpeed's references are
        dropped and the group ends with the default one at exit, ``dist``). Measured with DeepSpeed 0.19.8: no gloo
        thread left at exit. A failure here is a note, never the run's error: the results are written by now, and an
        exception already on its way stays the one reported."""
        try:
            self._let_go(ended)
        except Exception as e:  # noqa: BLE001 - see the docstring
            print(f"note: DeepSpeed's cleanup at the end of the run failed ({type(e).__name__}: {e}); the run's "
                  "output is unaffected", flush=True)

    def _let_go(self, ended: bool) -> None:
        module = self.engine.module
        group = getattr(self.engine, "data_parallel_group", None)
        self.engine.destroy()
        stack = importlib.import_module("deepspeed.runtime.zero.parameter_offload").FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not module]
        coordinator = importlib.import_module("deepspeed.runtime.zero.partitioned_param_coordinator")
        for fn in vars(coordinator.PartitionedParameterCoordinator).values():
            _clear_cache(fn)  # a class-level lru_cache keyed by (coordinator, submodule): it holds them all
        if group is None or not dist.is_dist() or dist.is_default_group(group):
            return
        if ended:
            self._deepspeed.comm.destroy_process_group(group)  # destroys it and drops DeepSpeed's references
        else:  # only the references: the group is destroyed with the others at exit (dist._destroy_at_exit)
            release = getattr(importlib.import_module("deepspeed.utils.groups"), "_release_process_group_references",
                              None)  # DeepSpeed 0.19.8 has it; where it is missing the clone stays held
            if release is not None:
                release(group)

    def full_state_dict(self):
        """Consolidated weights on rank 0 (ZeRO-3 partitions are gathered); None elsewhere."""
        if not self._zero3:
            return None
        params = list(self.engine.module.parameters())
        with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if dist.is_main():
                return retie(self.engine.module,
                             {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()})
        return None


class _Queued:
    """DeepSpeed's checkpoint engine with its writes handed to a background writer (``train/background.py``). It
    says it does not keep storage sharing, so DeepSpeed does not clone the model's tensors on the device first: the
    writer's copy to host memory makes each tensor compact (and tied ones one) as that clone would."""

    def __init__(self, own, writer) -> None:
        self.own, self.writer = own, writer

    def save(self, state_dict, path: str) -> None:
        self.writer.save(self.own.save, state_dict, Path(path))

    def preserves_storage_sharing(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.own, name)


def _deepspeed():
    """deepspeed, imported, with a process group to run in (DeepSpeed needs one even for one process)."""
    import deepspeed

    if not torch.cuda.is_available():
        # the shm all-reduce op JIT-compiles for ~1 min on first use and gloo does not need it
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    dist.init(single_process=True)
    return deepspeed


def init_config(ds_config: dict, dtype: torch.dtype) -> dict:
    """The config ``zero.Init`` builds the parameters in ``dtype`` from. The dtype goes through the config's
    ``bf16``/``fp16`` sections, not ``zero.Init``'s own ``dtype`` argument: DeepSpeed (0.19.8) ignores that argument
    on an accelerator it thinks cannot compute in fp16 (``dtype or fp16 if fp16 else bf16 if bf16 else fp32``), and
    builds in bf16 instead: the CPU wherever oneDNN lacks fp16 (seen on one of the two kinds of CI machine:
    fp32 masters built in bf16, the runs off the torch engine's curve by 3e-3)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"bug: zero.Init cannot build in {dtype}")
    return {**ds_config, "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}


class Zero3Build:
    """ZeRO-3 over several processes (``engine.zero3_init``): the model is built partitioned from the start, as
    DeepSpeed's ``zero.Init`` does, each process holding 1/N of every parameter, never the whole model; rank 0
    alone reads the checkpoint and each module's weights go from it into every rank's partitions. Without it each
    process loads the whole model in float32 (an 8B model: 32 GB a process, 256 GB on a node of 8) before
    ``deepspeed.initialize`` partitions it. ``models/build.py load_model`` drives the two steps below."""

    def __init__(self, ds_config: dict) -> None:
        self.ds_config = ds_config

    @contextlib.contextmanager
    def building(self, dtype: torch.dtype):
        """The context the model is constructed in: each parameter partitioned as its module is made (the same
        values on every rank: rank 0's, broadcast); no random initialisation (every value comes from rank 0's
        checkpoint next)."""
        from transformers.initialization import no_init_weights

        deepspeed = _deepspeed()
        deepspeed.init_distributed()  # its view of our group: the config's batch check counts the processes in it
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=init_config(self.ds_config, dtype)):
            yield

    def fill(self, model: nn.Module, source: nn.Module | None) -> None:
        """Rank 0's loaded ``source`` (the same class, None on the other ranks) into the partitioned ``model``, one
        module's parameters at a time (gathered, written by rank 0, partitioned again: DeepSpeed broadcasts the
        change). Every rank takes part in every gather. Buffers, which ZeRO does not partition, are rank 0's
        loaded ones on every rank."""
        deepspeed = _deepspeed()
        values = dict(source.named_parameters(remove_duplicate=False)) if source is not None else {}
        seen: set[int] = set()
        for prefix, module in model.named_modules():
            own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in module.named_parameters(recurse=False)
                   if id(p) not in seen]
            if not own:
                continue
            seen.update(id(p) for _, p in own)
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                if source is not None:
                    with torch.no_grad():
                        for name, p in own:
                            p.data.copy_(values[name].data)
        # rank 0's buffers as they are, dtype included (built under a bf16 default the rotary frequencies come
        # out bf16, loaded they are float32); small (no decoder LM keeps large buffers): sent as one object
        buffers = dist.broadcast_object({n: b.detach().cpu() for n, b in source.named_buffers()}
                                        if source is not None else None)
        for name, b in model.named_buffers():
            b.data = buffers[name].to(b.device)


def _clear_cache(fn, depth: int = 3) -> None:
    """Clear the ``functools.lru_cache`` of ``fn`` or of a function its closure wraps (DeepSpeed's NVTX
    decorator wraps without ``functools.wraps``)."""
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()
    elif depth and callable(fn):
        for cell in getattr(fn, "__closure__", None) or ():
            _clear_cache(cell.cell_contents, depth - 1)



def before_process_group() -> None:
    """What must be imported before the process group exists: DeepSpeed's communication module, like torch's
    (``dist.init``), takes the default group as a default argument when imported, and imported after the group
    it holds it past ``destroy_process_group`` into the interpreter's teardown. Every training run imports it
    where it is installed (transformers' ``AutoModel`` loads its DeepSpeed integration), so first, here."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401
