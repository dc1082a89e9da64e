"""``make pipeline``: stage 0 -> stage 1 -> filter -> mine -> stage 2 -> merge -> evaluation ->
reranker (+ merge) -> report, from one Hydra config (``configs/pipeline.yaml``).

Every stage runs as a subprocess of the one entry point on a resolved config written to
``<out>/configs/<stage>.yaml`` (training, filtering and mining through ``scripts/launch.sh``, so ``ngpu`` processes
with torchrun). A stage that finishes writes ``<out>/<stage>/.done.json`` (inputs, outputs, time);
a rerun skips finished stages, and an interrupted one resumes from its own checkpoints or shards.
``<out>/lineage.json`` records which inputs produced which outputs. The shared ``model`` and
``engine`` scale the whole run by overrides: ``model=qwen3-0.6b engine=zero2 ngpu=8
synth.backend=vllm synth.corpus=[...]``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qwen3train.errors import ConfigError, StoppedBySignal
from qwen3train.stage_marker import config_hash, path_fingerprint, unchanged
from qwen3train.train.config import RunConfig, TrainConfig
from qwen3train.data.collections import parse_spec
from qwen3train.data.sources import DataConfig
from qwen3train.eval.run import EvalConfig
from qwen3train.merge.apply import MergeConfig
from qwen3train.mining.filter import FilterConfig
from qwen3train.mining.mine import MineConfig
from qwen3train.models.build import ModelConfig
from qwen3train.synth.pipeline import SynthConfig
from qwen3train.train import preempt
from qwen3train.train.engine import EngineConfig
from qwen3train.train.schedule import OptimConfig


@dataclass
class StageEngine:
    """A stage's batch settings, spelled as under ``make stage1`` (``engine.global_batch_size``):
    ``stage1.engine.global_batch_size``. Backend, ZeRO stage and precision are the pipeline's ``engine``."""

    micro_batch_size: int = 16
    global_batch_size: int = 32
    grad_cache: bool = False
    micro_batch_tokens: int | None = None  # what an out-of-memory stop of this stage asks for (train/memory.py)


BATCH_FIELDS = ("micro_batch_size", "global_batch_size", "grad_cache", "micro_batch_tokens")


@dataclass
class TrainStage:
    """The per-stage part of a training run; model and the rest of the engine are the pipeline's."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: StageEngine = field(default_factory=StageEngine)
    max_length: int | None = None  # this stage's token budget (model.max_doc_length; the reranker's whole prompt)


# glibc: every block from the heap (none mmap'd, so none unmapped on free), the heap never trimmed, grown 512 MB at a time
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(512 << 20)}


def stage_env(environ, keep_freed_memory: bool) -> dict:
    """The environment a stage process starts with."""
    env = dict(environ, PYTHONWARNINGS="ignore",
               VLLM_ENABLE_V1_MULTIPROCESSING=environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"))
    if keep_freed_memory and not any(k.startswith("MALLOC_") for k in environ) \
            and "glibc.malloc" not in environ.get("GLIBC_TUNABLES", ""):
        env.update(KEEP_FREED_MEMORY)
    return env


@dataclass
class PipelineConfig:
    """extra_stage1_data / extra_stage2_data: labelled or weak pairs added to the synthetic ones
    (the embedded default adds the stdlib-docstring pairs). baseline: an embedder evaluated beside
    ours (default: all-MiniLM-L6-v2 when its package is installed)."""

    output_dir: str = "outputs/pipeline"
    ngpu: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    reranker_model: str | None = None  # the LLM the reranker starts from (default: model.name_or_path)
    engine: EngineConfig = field(default_factory=EngineConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    extra_stage1_data: list[str] = field(default_factory=list)
    extra_stage2_data: list[str] = field(default_factory=list)
    stage1: TrainStage = field(default_factory=TrainStage)
    filter: FilterConfig = field(default_factory=lambda: FilterConfig(inputs=[]))
    mine: MineConfig = field(default_factory=lambda: MineConfig(inputs=[]))
    stage2: TrainStage = field(default_factory=TrainStage)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rerank: TrainStage = field(default_factory=TrainStage)
    rerank_top_k: int = 20
    # the reranker's hard negatives: "final" mines them again with the final first stage (merged), the
    # retriever whose top-k it reranks (stage rerank_mine); "stage1": stage 2's file, mined by stage 1. On the
    # dev split (docs/benchmarks.md) "final" lifted the reranked nDCG@10 0.486 -> 0.559 over our first stage
    # and 0.737 -> 0.833 over a strong one (MiniLM)
    rerank_negatives: str = "final"
    rerank_mine_sample: int | None = None  # records mined for the reranker; null: mine.sample
    # "dev": the reranker's final score is fused with the first stage's, its weight chosen on the merge's dev
    # pairs (eval.rerank_fusion_dev_file); "none": the reranker alone (or eval.rerank_fusion's fixed weight).
    # On the dev split the best weight went from 0.4 over a strong first stage (MiniLM) to 0.9 over a weak one
    # (docs/benchmarks.md)
    rerank_fusion: str = "dev"
    rerank_merge: bool = True  # merge the reranker's checkpoints as ``merge`` says; false: its final checkpoint
    baseline: str | None = "auto"
    eval_all_checkpoints: bool = True  # every stage-2 checkpoint in the table; false: the last one only
    # Once a training stage is done, its checkpoints keep only their exported model (what merging and
    # evaluation read): the engine state (fp32 weights + AdamW moments, ~12 bytes a parameter) goes, 1.6 GB a
    # checkpoint for SmolLM2-135M. A finished stage is never resumed (a changed config reruns it from the
    # start), and its last checkpoint is written without it (``run.final_engine_state``: ~10 s and 1.6 GB a
    # stage saved here). true: keep everything, to train on from a checkpoint by hand.
    keep_engine_state: bool = False
    # The stage processes keep the memory they free (glibc: no mmap'd blocks, no trimming; MALLOC_* or
    # GLIBC_TUNABLES malloc settings in the environment win). With the defaults, a training step's mid-sized
    # tensors came fresh from the kernel every step (a 576x1536 MLP's forward and backward over 4,000 tokens:
    # 32k page faults a step, 94 with this); reranker and stage-2 steps ran 10-24% faster in four A/B pairs
    # (docs/benchmarks.md). A stage's memory then stays at its peak until it ends. false: the C library's
    # defaults. Other C libraries ignore it.
    keep_freed_memory: bool = True

    @property
    def rerank_mine_records(self) -> int | None:
        """Records stage rerank_mine samples (rerank_mine_sample, else mine.sample; None/0: all)."""
        return self.mine.sample if self.rerank_mine_sample is None else self.rerank_mine_sample

    def __post_init__(self) -> None:
        if self.rerank_negatives not in ("final", "stage1"):
            raise ValueError(f"rerank_negatives must be 'final' or 'stage1', got {self.rerank_negatives!r}")
        if self.rerank_fusion not in ("dev", "none"):
            raise ValueError(f"rerank_fusion must be 'dev' or 'none', got {self.rerank_fusion!r}")
        default = EngineConfig()
        for key in BATCH_FIELDS:  # one place per knob: batch sizes belong to each stage
            if getattr(self.engine, key) != getattr(default, key):
                from qwen3train.errors import ConfigError

                raise ConfigError(f"engine.{key} is set per stage in a pipeline: stage1.engine.{key}, "
                                  f"stage2.engine.{key}, rerank.engine.{key}")


SCHEMA = {TrainConfig: "train_schema", SynthConfig: "synth_schema", FilterConfig: "filter_schema",
          MineConfig: "mine_schema", MergeConfig: "merge_schema", EvalConfig: "eval_schema"}


class Pipeline:
    def __init__(self, cfg: PipelineConfig) -> None:
        from qwen3train.eta import ETA

        self.cfg = cfg
        self.out = Path(cfg.output_dir).resolve()
        self.eta = ETA(cfg)
        self.lineage_path = self.out / "lineage.json"
        self.lineage = json.loads(self.lineage_path.read_text()) if self.lineage_path.exists() else {}

    # ---- plumbing -------------------------------------------------------------------------------
    def stage(self, name: str, inputs: list, outputs: list, fn, cfg=None) -> None:
        """Run a stage unless it finished with the same config and the same inputs. ``.done.json`` keeps
        the hash of the stage's resolved config and a fingerprint of each input (size and time of every
        file); when either changed, the stage's old outputs are removed and it runs again, and so do the
        stages after it (their inputs, its outputs, change in turn)."""
        marker = self.out / name / ".done.json"
        order = self.stages()
        k = order.index(name) + 1 if name in order else 0
        head = f"[pipeline] {k}/{len(order)} {name}" if k else f"[pipeline] {name}"
        finger = {"config_hash": config_hash(cfg), "inputs": {str(i): path_fingerprint(Path(i)) for i in inputs}}
        if marker.exists():
            old = json.loads(marker.read_text())
            if unchanged(old, finger, inputs):
                print(f"{head}: done, skipped", flush=True)
                self.retire(name)  # again, in case a kill cut it short
                return
            why = "its config" if old["fingerprint"]["config_hash"] != finger["config_hash"] else "its inputs"
            print(f"[pipeline] {name}: {why} changed since it ran: removing its outputs and running it again",
                  flush=True)
            self.remove(name, outputs)
        from qwen3train.eta import fmt

        left = self.eta.remaining(order[k - 1:]) if k else 0.0
        after = len(order) - k
        rest = {0: "this stage", 1: "this and the stage after it"}.get(after, f"this and the {after} stages after it")
        print(f"{head}: running (estimated {fmt(left)} for {rest})",
              flush=True)
        t = time.time()
        fn()
        self.eta.done(name, time.time() - t)
        missing = [str(o) for o in outputs if not Path(o).exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished without its outputs: {missing}")
        rec = {"inputs": [str(i) for i in inputs], "outputs": [str(o) for o in outputs],
               "seconds": round(time.time() - t, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "fingerprint": finger, "fingerprint_version": 2}
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(rec, indent=2))
        self.lineage[name] = rec
        self.lineage_path.write_text(json.dumps(self.lineage, indent=2))
        self.retire(name)

    TRAINING = ("stage1", "stage2", "rerank")

    def retire(self, name: str) -> None:
        """A done training stage's checkpoints keep their exports only (``keep_engine_state``)."""
        if self.cfg.keep_engine_state or name not in self.TRAINING:
            return
        from qwen3train.train.checkpoint import list_checkpoints, retire

        freed = [retire(p) for p in list_checkpoints(self.out / name)]
        if any(freed):
            print(f"[pipeline] {name}: the optimizer state of {sum(1 for f in freed if f)} checkpoint(s) removed, "
                  f"{sum(freed) / 1e9:.1f} GB freed (their exported models stay; keep_engine_state=true keeps it)",
                  flush=True)

    def remove(self, name: str, outputs: list) -> None:
        for path in {self.out / name, *map(Path, outputs)}:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def drop(self, name: str, outputs: list) -> None:
        """A stage the config now leaves out: its outputs from an earlier run go (no stale model stays
        beside the current ones) and so does its lineage entry (the report lists the stages that ran)."""
        if self.lineage.pop(name, None) is not None or (self.out / name).exists():
            print(f"[pipeline] {name}: left out by the config: removing its earlier outputs", flush=True)
            self.remove(name, outputs)
            self.lineage_path.write_text(json.dumps(self.lineage, indent=2))

    def launch(self, name: str, cfg, processes: int = 1) -> None:
        """Write the resolved config and run it with the one entry point (torchrun when processes > 1)."""
        conf_dir = self.out / "configs"
        conf_dir.mkdir(parents=True, exist_ok=True)
        node = OmegaConf.structured(cfg)
        defaults = [SCHEMA[type(cfg)]]
        if isinstance(cfg, TrainConfig):
            defaults.append({"loss": cfg.loss.name})
        body = OmegaConf.to_container(node)
        body["defaults"] = defaults + ["_self_"]
        body["hydra"] = {"run": {"dir": str(self.out / "logs" / name)}, "output_subdir": None,
                         "job": {"chdir": False}}
        conf_name = f"resolved_{name}"  # never the name of a config in configs/ (search-path clash)
        (conf_dir / f"{conf_name}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(body)))
        env = stage_env(os.environ, self.cfg.keep_freed_memory)
        args = ["-m", "qwen3train.cli.main", f"--config-dir={conf_dir}", f"--config-name={conf_name}",
                "hydra/job_logging=stdout"]
        nnodes = os.environ.get("NNODES", "1")
        if processes > 1 or nnodes != "1":  # torchrun via cli.ranks, as scripts/launch.sh (never the deepspeed launcher)
            args = ["-m", "qwen3train.cli.ranks", "--nnodes", nnodes, "--node_rank", os.environ.get("NODE_RANK", "0"),
                    "--nproc_per_node", str(processes), "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
                    "--master_port", os.environ.get("MASTER_PORT", "auto"), *args]
        # in the caller's folder: relative paths hold; SIGTERM goes on to the stage (training saves and stops)
        with subprocess.Popen([sys.executable, *args], env=env) as proc, preempt.forwarding(proc):
            try:
                proc.wait()
            except BaseException:  # Ctrl-C, an error here: the stage goes too (as subprocess.run did)
                proc.kill()
                raise
        if proc.returncode in (preempt.STATUS, -signal.SIGTERM):  # training saved a checkpoint; the other
            # stages keep their finished shards and chunks
            raise StoppedBySignal(f"{preempt.STOPPED}SIGTERM during stage {name}; what it finished is kept: rerun the "
                                  f"same command to resume", signal.SIGTERM)
        if proc.returncode == 2:  # the stage said what the user must fix, in one line above
            per_stage = (f" (batch settings are per stage here: {name}.engine.micro_batch_tokens=..., "
                         f"{name}.run.resume=...)" if name in self.TRAINING else "")
            raise ConfigError(f"stage {name} stopped on the error above; fix it{per_stage} and rerun the same "
                              f"command to resume from {name}")
        if proc.returncode != 0:  # a crash or a kill: its own output above says what happened
            raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); rerun to resume it")

    def train_cfg(self, stage: TrainStage, name: str, files: list[str], init_from: str | None,
                  base: str | None = None) -> TrainConfig:
        model = copy.deepcopy(self.cfg.model)
        if base:
            model.name_or_path = base
        model.init_from = init_from
        if stage.max_length is not None:
            model.max_doc_length = stage.max_length
        data = replace(stage.data, train_files=files)
        engine = replace(self.cfg.engine, **{k: getattr(stage.engine, k) for k in BATCH_FIELDS})
        # the last checkpoint without the optimizer state that ``retire`` would remove once the stage is done
        run = replace(stage.run, name=name, output_dir=str(self.out / name),
                      final_engine_state=stage.run.final_engine_state and self.cfg.keep_engine_state)
        return TrainConfig(run=run, model=model, data=data, loss=stage.loss, engine=engine, optim=stage.optim)

    def stages(self) -> list[str]:
        """The stages this config runs, in order (for "stage k of N" and the ETA)."""
        return ["synth", "stage1", "filter", "mine", "stage2", "merge",
                *(["rerank_mine"] if self.cfg.rerank_negatives == "final" else []), "rerank",
                *(["rerank_merge"] if self.cfg.rerank_merge else []), "eval", "report"]

    # ---- the method -----------------------------------------------------------------------------
    def run(self) -> Path:
        c, o = self.cfg, self.out
        synth = replace(c.synth, output_dir=str(o / "synth"))
        self.stage("synth", synth.corpus, [o / "synth" / "pairs.jsonl", o / "synth" / "stats.json"],
                   lambda: self.launch("synth", synth), synth)
        s1_files = [str(o / "synth" / "pairs.jsonl")] + list(c.extra_stage1_data)
        s1 = self.train_cfg(c.stage1, "stage1", s1_files, None)
        self.stage("stage1", s1_files, [o / "stage1" / "final"], lambda: self.launch("stage1", s1, c.ngpu), s1)
        # filter and mine format texts as stage 1 trained the embedder they use (one instruction rule)
        flt = replace(c.filter, inputs=[str(o / "synth" / "pairs.jsonl")], embedder=str(o / "stage1" / "final"),
                      output_dir=str(o / "filter"), task_instructions=dict(c.stage1.data.task_instructions),
                      default_instruction=c.model.default_instruction,
                      symmetric_tasks=list(c.stage1.data.symmetric_tasks))
        self.stage("filter", flt.inputs + [flt.embedder], [o / "filter" / "kept.jsonl"],
                   lambda: self.launch("filter", flt, c.ngpu), flt)
        mine_in = [str(o / "filter" / "kept.jsonl")] + list(c.extra_stage2_data)
        mine = replace(c.mine, inputs=mine_in, embedder=str(o / "stage1" / "final"), output=str(o / "mine" / "mined.jsonl"),
                       cache_dir=str(o / "cache"), task_instructions=dict(c.stage1.data.task_instructions),
                       default_instruction=c.model.default_instruction)
        self.stage("mine", mine_in + [mine.embedder], [o / "mine" / "mined.jsonl"], lambda: self.launch("mine", mine, c.ngpu), mine)
        s2 = self.train_cfg(c.stage2, "stage2", [mine.output], str(o / "stage1" / "final"))
        self.stage("stage2", [mine.output, o / "stage1" / "final"], [o / "stage2" / "final"],
                   lambda: self.launch("stage2", s2, c.ngpu), s2)
        mrg = replace(c.merge, inputs=[], run_dir=str(o / "stage2"), output_dir=str(o / "merged"))
        self.stage("merge", [o / "stage2" / "checkpoints"], [o / "merged"], lambda: self.launch("merge", mrg), mrg)
        rr_files = [mine.output]
        if c.rerank_negatives == "final":  # the negatives of the retriever whose top-k the reranker reorders
            rmine = replace(mine, embedder=str(o / "merged"), output=str(o / "rerank_mine" / "mined.jsonl"),
                            sample=c.rerank_mine_records)
            self.stage("rerank_mine", mine_in + [rmine.embedder], [Path(rmine.output)],
                       lambda: self.launch("rerank_mine", rmine, c.ngpu), rmine)
            rr_files = [rmine.output]
        else:
            self.drop("rerank_mine", [o / "rerank_mine"])
        rr = self.train_cfg(c.rerank, "rerank", rr_files, None, base=c.reranker_model)
        self.stage("rerank", rr_files, [o / "rerank" / "final"], lambda: self.launch("rerank", rr, c.ngpu), rr)
        # dev selection scores embedders; the reranker's checkpoints are merged as configured (or not at all)
        if c.rerank_merge:
            rmrg = replace(c.merge, inputs=[], run_dir=str(o / "rerank"), output_dir=str(o / "rerank_merged"),
                           dev_file=None)
            self.stage("rerank_merge", [o / "rerank" / "checkpoints"], [o / "rerank_merged"],
                       lambda: self.launch("rerank_merge", rmrg), rmrg)
        else:
            self.drop("rerank_merge", [o / "rerank_merged"])
        ev = self.eval_cfg()
        self.stage("eval", list(ev.models.values()), [o / "eval" / "results.jsonl"], lambda: self.launch("eval", ev, c.ngpu), ev)
        from qwen3train.report import write_report

        self.stage("report", [o / "eval" / "results.jsonl"], [o / "report.md"], lambda: write_report(o, self.cfg))
        print(f"[pipeline] done: {o / 'report.md'}", flush=True)
        return o / "report.md"

    def eval_cfg(self) -> EvalConfig:
        c, o = self.cfg, self.out
        models = {"base": c.model.name_or_path, "stage1": str(o / "stage1" / "final")}
        from qwen3train.merge.apply import select_checkpoints

        for p in select_checkpoints(o / "stage2", last=0 if c.eval_all_checkpoints else 1, every=1):
            models[f"stage2@{int(p.parent.name.split('_')[1])}"] = str(p)
        models["merged"] = str(o / "merged")
        baseline = c.baseline
        if baseline == "auto":
            from qwen3train.synth.personas import default_embedder

            baseline = default_embedder()
        if baseline:
            models["baseline:" + Path(baseline).parent.name if Path(baseline).name == "model" else "baseline"] = baseline
        pairs = [p for p in c.eval.pairs if Path(p).exists()]
        held = o / "synth" / "heldout.jsonl"
        if held.exists() and held.stat().st_size > 0:
            pairs.append(str(held))
        cols = []
        for col in c.eval.collections:
            if parse_spec(col)[0].exists():
                cols.append(col)
            else:
                print(f"[pipeline] eval: collection {col} not found, left out", flush=True)
        reranker = ("reranker(merged)", o / "rerank_merged") if c.rerank_merge else ("reranker", o / "rerank" / "final")
        rerankers = {reranker[0]: str(reranker[1])} if cols else {}
        sts = [f for f in c.eval.sts if Path(f).exists()]
        # the base model is scored with the end token training appends (an export records its own)
        end_tokens = {"base": c.model.end_token} if c.model.end_token else {}
        dev = c.merge.dev_file if c.rerank_fusion == "dev" and c.merge.dev_file and Path(c.merge.dev_file).exists() \
            else c.eval.rerank_fusion_dev_file
        return replace(c.eval, models=models, pairs=pairs, collections=cols, sts=sts, end_tokens=end_tokens,
                       rerank_fusion_dev_file=dev,
                       output_dir=str(o / "eval"),
                       cache_dir=str(o / "cache"), rerankers=rerankers, rerank_retriever=str(o / "merged"),
                       rerank_top_k=c.rerank_top_k,
                       # the reranker is scored with the prompt budget it was trained with unless eval says
                       rerank_max_length=c.eval.rerank_max_length or c.rerank.max_length)


def run(cfg: PipelineConfig) -> Path:
    return Pipeline(cfg).run()
