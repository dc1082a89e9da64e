"""Evaluation during training (``run.eval_every``): the model being trained scores a dev set every N
steps and at the end; the scores go to metrics.jsonl (``dev_<metric>``), wandb and ``dev_eval.jsonl``,
and ``best.json`` names the best step (its checkpoint is kept by the pruning, and ``make merge``
can select checkpoints by it: ``select.best``).

Dev sets: a pair file (each query against the pool of the file's positives, as ``make eval`` scores
held-out pairs; the reranker ranks each query's positives and negatives, or, where a row has none, its
positives among the next 9 rows' positives) or, for embedders, a BEIR/TREC folder. Every rank runs the
same evaluation on the unwrapped model (no collective but ZeRO-3's parameter gathering, which all ranks
then do together), so the loop needs no rank-0-only branch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen3train.errors import ConfigError
from qwen3train.eval.metrics import evaluate_run


METRICS = ("ndcg@10", "recall@100", "mrr@10")


class _InMemoryEncoder:
    """The Encoder interface evaluation uses, over the embedder being trained (no export, no cache)."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder

    def encode_queries(self, texts: list[str], instruction: str | None) -> torch.Tensor:
        return self.embedder.encode(texts, instruction=instruction)

    def encode_docs(self, texts: list[str], instruction: str | None = None) -> torch.Tensor:
        return self.embedder.encode(texts, instruction=instruction)

    def cached_docs(self, texts: list[str], cache_dir=None, instruction: str | None = None) -> torch.Tensor:
        return self.encode_docs(texts, instruction)


class DevEval:
    def __init__(self, path: str, task, metric: str = "ndcg@10", top_k: int = 100) -> None:
        self.path, self.task, self.metric, self.top_k = Path(path), task, metric, top_k
        if not self.path.exists():
            raise ConfigError(f"run.eval_file: {path} does not exist")
        self.kind = "reranker" if hasattr(task, "reranker") else "embedder"
        if self.path.is_dir():
            if self.kind == "reranker":
                raise ConfigError("run.eval_file: the reranker scores a pair file (query, pos, neg), not a collection")
            from qwen3train import dist
            from qwen3train.data.collections import load_collection, splits

            # the best step is chosen on these scores: a collection's dev split where it has one (BEIR's
            # qrels/dev.tsv, MS MARCO's qrels.dev.tsv), else its test split, said once: then not held out
            split = "dev" if "dev" in splits(self.path) else "test"
            if split == "test" and dist.rank() == 0:
                print(f"note: run.eval_file {path} has no dev split (qrels/dev.tsv): its test judgments score the "
                      f"run and pick best.json's step; do not report this collection's figures as held out",
                      flush=True)
            self.collection = load_collection(self.path, split)
            self.rows = None
        else:
            from qwen3train.data.jsonl import read_jsonl

            self.rows, self.collection = read_jsonl(self.path), None
            if not self.rows:
                raise ConfigError(f"run.eval_file: {path} holds no pairs")

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        module = self.task.module
        was = module.training
        module.eval()
        try:
            res = self._reranker() if self.kind == "reranker" else self._embedder()
        finally:
            module.train(was)
        scores = {k: float(res[k]) for k in METRICS if k in res}
        if self.metric not in scores:
            raise ConfigError(f"run.eval_metric: {self.metric} is not one of {sorted(scores)}")
        return scores

    def at_step(self, run_dir: Path, step: int) -> dict[str, float]:
        """The scores, with out of device memory as one line that says the step's checkpoint is safe (the
        loop saves before it evaluates; the encoders themselves first retry smaller: models/fit.py)."""
        from qwen3train.errors import OutOfMemory
        from qwen3train.models.fit import is_out_of_memory
        from qwen3train.train.checkpoint import kept_line

        try:
            return self()
        except Exception as e:  # noqa: BLE001 - only out of memory is caught (wrapped too: models/fit.py)
            if not (isinstance(e, OutOfMemory) or is_out_of_memory(e)):
                raise
            raise OutOfMemory(f"dev evaluation at step {step}: {str(e).splitlines()[0]} ({kept_line(run_dir)}; a "
                              f"rerun evaluates a missed step after resuming)") from None

    def _embedder(self) -> dict:
        """Scored by ``make eval``'s own code, with the model in memory in place of a loaded export."""
        from qwen3train.eval.pairs import evaluate_pairs
        from qwen3train.eval.retrieval import evaluate_collection

        enc = _InMemoryEncoder(self.task.embedder)
        if self.collection is not None:
            return evaluate_collection(None, self.collection, encoder=enc)
        return evaluate_pairs(None, self.path, encoder=enc, instructions=getattr(self.task, "instructions", None))

    def _reranker(self) -> dict:
        rr = self.task.reranker
        rows, run, qrels = self.rows, {}, {}
        for i, r in enumerate(rows):
            cands = list(dict.fromkeys(r["pos"] + list(r.get("neg") or [])))
            if len(cands) == len(r["pos"]):  # no negatives: the next rows' positives
                others = [p for k in range(1, len(rows)) for p in rows[(i + k) % len(rows)]["pos"]]
                cands += [p for p in dict.fromkeys(others) if p not in r["pos"]][:9]
            own = r.get("instruction") or r.get("prompt")
            instructions = getattr(self.task, "instructions", None)
            instr = instructions.query(r.get("task") or "default", own) if instructions is not None else own
            probs = rr.score(r["query"], cands, instruction=instr)
            run[str(i)] = [(str(j), float(p)) for j, p in enumerate(probs.tolist())]
            qrels[str(i)] = {str(j): 1 for j, c in enumerate(cands) if c in r["pos"]}
        return evaluate_run(run, qrels)


def record(run_dir: Path, step: int, scores: dict, metric: str, checkpoint: str | None) -> dict:
    """Append to dev_eval.jsonl; update best.json when this step is the best so far. Returns best."""
    with open(run_dir / "dev_eval.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **scores, "checkpoint": checkpoint}) + "\n")
    best_path = run_dir / "best.json"
    best = json.loads(best_path.read_text()) if best_path.exists() else None
    if best is None or scores[metric] > best["score"]:
        best = {"step": step, "metric": metric, "score": scores[metric], "checkpoint": checkpoint}
        best_path.write_text(json.dumps(best, indent=2))
    return best


def missed(run_dir: Path, step: int, every: int, total: int) -> bool:
    """A resumed run's step that was due a dev evaluation (not the last: that is evaluated before the final
    save) and has none on record: the run stopped between the checkpoint's save and its evaluation. Every
    rank gets rank 0's answer (every rank evaluates)."""
    from qwen3train import dist

    def look() -> bool:
        p = Path(run_dir) / "dev_eval.jsonl"
        done = {json.loads(line)["step"] for line in p.read_text().splitlines()} if p.exists() else set()
        return 0 < step < total and step % every == 0 and step not in done

    return bool(dist.broadcast_object(look() if dist.is_main() else None))


def best_step(run_dir: Path) -> int | None:
    p = Path(run_dir) / "best.json"
    return json.loads(p.read_text())["step"] if p.exists() else None


def ranked_checkpoints(run_dir: Path) -> list[tuple[int, float]]:
    """(step, score) of the evaluated steps that still have a checkpoint, best first."""
    from qwen3train.train.checkpoint import step_dir

    p = Path(run_dir) / "dev_eval.jsonl"
    if not p.exists():
        return []
    metric = json.loads((Path(run_dir) / "best.json").read_text())["metric"]
    last = {}
    for line in p.read_text().splitlines():
        r = json.loads(line)
        last[r["step"]] = r[metric]  # a resumed run re-evaluates a step: keep the latest
    return sorted(((s, v) for s, v in last.items() if (step_dir(Path(run_dir), s) / "model").exists()),
                  key=lambda x: (-x[1], -x[0]))
