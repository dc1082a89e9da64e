"""The FSDP engine (``engine=fsdp``): torch's own fully sharded data parallel (FSDP2, ``fully_shard``), with no
DeepSpeed. It implements ``train.engine.Engine``. Besides ``qwen3train.dist`` (the mesh), the one module that
imports FSDP and torch's distributed checkpoints; its own collectives (the structure check, the load report, the
buffers' broadcast) go through ``qwen3train.dist``.

Each decoder layer is one unit and the rest of the model (embeddings, final norm, the LM head) another: a rank
holds 1/world of every float32 weight, gradient and AdamW moment, and a unit's weights are whole only while it
runs (gathered before its forward and its backward, freed after). Gradients are reduce-scattered (averaged, as
DDP's are) after every backward call, so accumulation and GradCache chunks never hold whole gradients either.

Precision, the package's rule (``qwen3train.precision``): float32 masters and optimizer state. bf16 compute is
FSDP's own mixed precision (``MixedPrecisionPolicy``): each unit's shard is cast to bf16 before it is gathered,
so the forward and backward run on bf16 weights with no autocast, and gradients are reduced in float32.

Loading (``engine.fsdp_load=rank0``, the default on several processes): rank 0 reads the checkpoint; the other
ranks build the model with no weights (meta device, ``models.build.load_model``), and after sharding receive their
shards from rank 0 (``broadcast_from_rank0``), one tensor at a time. Host memory holds one copy of the model per
node, not one per process, and the files are read once. Every rank's parameters (names, shapes, dtypes, ties) are
checked against rank 0's before anything is sent.

Checkpoints are torch's distributed checkpoints (``torch.distributed.checkpoint``): every rank writes its own
shards of the weights and the optimizer moments, and a checkpoint resumes on any process count (the load
reshards). Exports gather the whole weights on rank 0 (``full_state_dict``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qwen3train import dist
from qwen3train.errors import ConfigError
from qwen3train.models.export import retie
from qwen3train.train.engine import ENGINE_FILES, EngineConfig, TorchEngine, check_written_by, device, report_load
from qwen3train.train.schedule import OptimConfig, build_optimizer

FOLDER = ENGINE_FILES["fsdp"]  # the distributed checkpoint under <checkpoint>/engine/


def units(module: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(decoder layers, the module whose forward every use of the model goes through): the Embedder's
    backbone (its ``encode`` calls the backbone directly) and the Reranker itself (its LM head's rows are
    read in its own forward). Every trainable parameter must lie inside the second: one outside would be
    neither sharded nor averaged."""
    layers = [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ConfigError(f"engine=fsdp: no decoder layers found in {type(module).__name__}")
    root = module.backbone if getattr(module, "backbone", None) is not None else module
    inside = {id(p) for p in root.parameters()}
    outside = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise RuntimeError(f"bug: engine=fsdp would leave trainable parameters out of its units: {outside[:3]}")
    return layers, root


def signature(module: nn.Module) -> list[tuple]:
    """What every rank's model must share with rank 0's before weights are sent: each parameter's name, shape,
    dtype, trainability and the first name it goes by (tied weights), and each buffer's name, shape and dtype."""
    first: dict[int, str] = {}
    rows = [(name, tuple(p.shape), str(p.dtype), p.requires_grad, first.setdefault(id(p), name))
            for name, p in module.named_parameters(remove_duplicate=False)]
    return rows + [(name, tuple(b.shape), str(b.dtype)) for name, b in module.named_buffers()]


def same_structure(module: nn.Module) -> None:
    """Every rank built the parameters rank 0 loaded (collective); else every rank stops with the first difference
    (a model the empty build does not reproduce would otherwise hang or crash inside a collective)."""
    mine = signature(module)
    ref = dist.broadcast_object(mine if dist.is_main() else None)
    diff = None
    if mine != ref:
        diff = next((f"{a} vs rank 0's {b}" for a, b in zip(mine, ref) if a != b),
                    f"{len(mine)} parameters and buffers vs rank 0's {len(ref)}")
    bad = [(r, d) for r, d in enumerate(dist.all_gather_object(diff)) if d is not None]
    if bad:
        rank, what = bad[0]
        raise RuntimeError(f"engine.fsdp_load=rank0: rank {rank} built the model without weights differently from "
                           f"rank 0 ({what}); engine.fsdp_load=every_rank reads the weights on every rank")


class FSDPEngine(TorchEngine):
    """FSDP2 over all processes (CUDA with NCCL, or the CPU with gloo); AdamW + LambdaLR; clipping. The step (the
    norm over every rank's shards), the schedule and a dropped step are the torch engine's."""

    def __init__(self, model: nn.Module, cfg: EngineConfig, optim: OptimConfig, total_steps: int,
                 precision: str = "fp32") -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dist.init(single_process=True)  # a mesh needs a process group, even of one
        self.cfg, self.precision, self.device = cfg, precision, device()
        broadcast, full = cfg.broadcast_load(dist.world_size()), None
        if broadcast:  # sharding moves each unit to the device as it goes; rank 0 keeps the whole weights on the host
            same_structure(model)
            full = model.state_dict() if dist.is_main() else {}
        else:
            model = model.to(self.device)
        self.model = model
        self.mesh = mesh = dist.world_mesh(self.device.type, cfg.hybrid_shard(dist.world_size()))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        layers, root = units(model)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
        fully_shard(root, mesh=mesh, mp_policy=policy)
        note = cfg.shard_groups_note(dist.world_size(), dist.local_world_size())
        if note and dist.is_main():
            print(note, flush=True)
        if mesh.ndim == 2 and dist.is_main():  # what FSDP made of it, read off a parameter
            print(f"engine=fsdp: hybrid sharding, {mesh.shape[0]} copies of the model's state, each sharded over "
                  f"{mesh.shape[1]} processes (placements {tuple(next(model.parameters()).placements)})", flush=True)
        empty = self._receive(full) if broadcast else False
        full = None  # rank 0's host copy goes
        if dist.world_size() > 1:
            report_load("engine=fsdp", empty, "rank 0 read the weights; {n} of the {others} other ranks built the model "
                        "without them and received their shards", "each of the {ranks} ranks read the weights")
        self.optimizer, self.scheduler = build_optimizer(model.named_parameters(), optim, total_steps)
        # no DDP wrapper (gradients are reduce-scattered at every backward: no micro step holds them back) and no
        # autocast (bf16 compute is the units' mixed precision)
        self.wrapped, self.autocast, self.step_applied = model, False, True
        self.stager, self.pinned = None, False  # the copies of a checkpoint written in the background (``_staged``)

    def _receive(self, full: dict) -> bool:
        """Rank 0's weights into every rank's shards (collective). The empty ranks' shards are first made real on
        the device (uninitialised), so that every rank loads on the same device; buffers, which FSDP does not
        shard, and which are not all in a state dict (non-persistent rotary frequencies), are broadcast whole."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        empty = any(p.is_meta for p in self.model.parameters())
        if empty:
            self.model.to_empty(device=self.device)
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        dist.broadcast_(list(self.model.buffers()))
        return empty

    def save(self, path: Path, writer) -> None:
        """Every rank writes its shards (``torch.distributed.checkpoint``); rank 0 the schedule. In the foreground at
        once, over the default group. Under a background writer, copies of the shards are taken now (``_staged``)
        and the writer's thread plans and writes them over a group of their own (``dist.checkpoint_group``: the
        training thread's collectives go on meanwhile), then names this rank's files for its checksums."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path.mkdir(parents=True, exist_ok=True)
        model, optimizer = get_state_dict(self.model, self.optimizer)
        state, folder = {"model": model, "optimizer": optimizer}, path / FOLDER
        if writer.background:
            staged, group = self._staged(state), dist.checkpoint_group()

            def job() -> list[Path]:
                dcp.save(staged, checkpoint_id=str(folder), process_group=group)
                # dcp's file writer names a rank's files __<rank>_<n>.distcp; files of other names (another torch)
                # are hashed at the save's finish instead, as in the foreground
                return [*folder.glob(f"__{dist.rank()}_*.distcp"), *([folder / ".metadata"] if dist.is_main() else [])]

            writer.call_listing(job)
        else:
            dcp.save(state, checkpoint_id=str(folder))
        if dist.is_main():
            writer.save(torch.save, self.scheduler.state_dict(), path / "scheduler.pt")

    def _stager_of(self, pinned: bool):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self.device.type == "cuda"
        return DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False, use_async_staging=False,
                                            use_non_blocking_copy=cuda))

    def _staged(self, state: dict) -> dict:
        """A copy of ``state`` in host memory (its DTensors' local shards, copied). On CUDA into pinned memory,
        without waiting for each copy; the stager keeps its copies' memory from one save to the next (one copy of
        this rank's shards of the weights and both AdamW moments, ~12 bytes a parameter / processes), so a save
        allocates no pinned memory after the first. Where pinned memory cannot be had (a container's memlock
        limit), ordinary memory."""
        cuda = self.device.type == "cuda"
        if self.stager is None:
            self.stager, self.pinned = self._stager_of(pinned=cuda), cuda
        try:
            return self.stager.stage(state)
        except RuntimeError:
            if not self.pinned:
                raise
            print("note: no pinned host memory for the checkpoint's copies: ordinary memory instead", flush=True)
            self.stager.close()
            self.stager, self.pinned = self._stager_of(pinned=False), False
            return self.stager.stage(state)

    def load(self, path: Path, saved_world: int | None = None) -> None:
        """Any process count: each rank reads the slices of the saved shards its own shards cover."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        check_written_by(path, "fsdp")
        model, optimizer = get_state_dict(self.model, self.optimizer)
        state = {"model": model, "optimizer": optimizer}
        dcp.load(state, checkpoint_id=str(path / FOLDER))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if saved_world not in (None, dist.world_size()) and dist.is_main():
            print(f"note: {path.parent} was written by {saved_world} processes; its FSDP shards were read "
                  f"resharded for {dist.world_size()}", flush=True)

    def full_state_dict(self):
        """The whole weights on rank 0 (gathered from every rank's shards; collective), on the CPU; None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return retie(self.model, full) if dist.is_main() else None

    def close(self, ended: bool) -> None:
        """The mesh keeps the world group in a registry of its own, and torch's caches keep the mesh: the group
        then outlived its destruction (``dist``) into the interpreter's teardown, its gloo threads still running
        at exit (seen by the 2-process test's exit probe), where a rank can abort after its work is done. The
        registry is emptied; the model's FSDP state, which also names the group, goes with the model. The copies of
        background saves and their group go too at the end of a run (after an error, as the process exits)."""
        dist.release_mesh(self.mesh)
        # after an error a writer may still be reading the copies, in a collective on the group: both go at exit
        if ended:
            if self.stager is not None:
                self.stager.close()
                self.stager = None
            dist.release_checkpoint_group()
