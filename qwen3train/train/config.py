"""The training stages' root schema: a run (where, how long, checkpoints) plus the component schemas
that live beside their code (model, data, loss, engine, optimizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen3train.data.sources import DataConfig
from qwen3train.losses.infonce import InfoNCEConfig
from qwen3train.losses.rerank import RerankLossConfig
from qwen3train.models.build import ModelConfig
from qwen3train.train.engine import EngineConfig
from qwen3train.train.schedule import OptimConfig


@dataclass
class RunConfig:
    """Where a run writes and how long it lasts.

    save_every: optimizer steps between checkpoints (0: only the final one). keep_last: how many
    recent checkpoints to keep; keep_every: also keep every n-th step's (the merge stage samples them).
    final_engine_state: the last checkpoint keeps the optimizer, scheduler and RNG state (to train the
    same run on past max_steps); false writes it export-only, as ``checkpoint.retire`` leaves a finished
    run (the pipeline sets it from ``keep_engine_state``: ~12 bytes a parameter it would delete anyway).
    skip_nonfinite_steps: a step whose gradients are not finite (inf/NaN: an overflow, a bad batch) is
    skipped, as DeepSpeed does: no update (weights, optimizer moments and the learning-rate schedule stay
    as they were), the data moves on, and the step's records are written to ``<run>/skipped_steps.jsonl``.
    More skipped steps than this in a row stop the run (it has diverged: one line, status 2, naming the
    last good checkpoint); 0: stop at the first.
    save_in_background: a save stops training only to copy its tensors to host memory; its files are written,
    hashed and moved into place by a thread while the next steps run (train/background.py). Costs host memory for
    one copy of the rank's state until written. The final save and a save on SIGTERM are always in the foreground.
    None (the default): on CUDA, where the host's cores are idle while the GPU steps; not when training on the CPU,
    where the writer would take cores from the step (measured: docs/benchmarks.md).
    stall_report_s: when no step, checkpoint save or dev evaluation has finished for this many seconds, each
    rank prints one line naming the phase it is in and the Python stacks of its threads (qwen3train/stall.py);
    nothing is stopped. 0: off. The default comes before the collectives' 30-minute timeout.
    """

    name: str = "stage1"
    output_dir: str = "outputs/stage1"
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0
    save_every: int = 0
    keep_last: int = 2
    keep_every: int = 0
    save_in_background: bool | None = None
    export_checkpoints: bool = True
    final_engine_state: bool = True
    skip_nonfinite_steps: int = 3
    stall_report_s: float = 900.0
    resume: str = "auto"  # auto: resume a run of the same config, refuse another; force; never (true/false too)
    wandb: bool = False
    wandb_project: str = "qwen3train"
    # evaluation during training (train/dev_eval.py): every eval_every steps and at the end, the model
    # scores eval_file (a dev pair file or, for embedders, a BEIR/TREC folder; never an evaluation set);
    # logged as dev_<metric>, the best step in best.json, its checkpoint kept by the pruning
    eval_every: int = 0
    eval_file: str | None = None
    eval_metric: str = "ndcg@10"

    def __post_init__(self) -> None:
        if self.stall_report_s < 0:
            raise ValueError("run.stall_report_s must be >= 0 (0: no report)")
        if self.skip_nonfinite_steps < 0:
            raise ValueError("run.skip_nonfinite_steps must be >= 0 (0: stop at the first non-finite step)")
        if self.eval_every > 0 and not self.eval_file:
            raise ValueError("run.eval_every > 0 needs run.eval_file (a dev pair file or collection folder)")
        from qwen3train.train.identity import normalize_resume

        self.resume = normalize_resume(self.resume)


@dataclass
class ExportConfig:
    """The model card every export carries (models/card.py) and the upload of the final export.

    license: the card's licence (keep it compatible with the base model's). push_to_hub: a hub repo id
    (``user/name``) that the final export is uploaded to at the end of the run (rank 0; needs a token,
    ``HF_TOKEN`` or ``huggingface-cli login``); hub_private: create the repo private."""

    license: str = "apache-2.0"
    push_to_hub: str | None = None
    hub_private: bool = True

    def __post_init__(self) -> None:
        import re

        if self.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to_hub):
            raise ValueError(f"export.push_to_hub must be a hub repo id 'user/name', got {self.push_to_hub!r}")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: Any = None  # a loss group option (InfoNCEConfig, RerankLossConfig): the type picks the task
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.loss, (InfoNCEConfig, RerankLossConfig)):
            raise ValueError("loss must be chosen from the loss group (loss=infonce or loss=rerank)")
