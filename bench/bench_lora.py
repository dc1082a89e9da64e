"""Full fine-tuning vs LoRA, and bf16 autocast vs fp32, on the real backbone (SmolLM2-135M-Instruct, CPU).

    .venv/bin/python bench/bench_lora.py [--steps 12]

Each variant is one `stage1` run through the CLI, in turn, on the real recipe's training data
(`make real-data`), batch 32, then nDCG@10 of its export on the dev split (`dev_select.jsonl`; never
an evaluation set). Reported: median step time (steps after the first two), peak RSS of the run,
loss first -> last, dev nDCG@10. Variants: full FT bf16 (the recipe), full FT fp32, LoRA r=16 bf16
at lr 1e-4 (the recipe's lr) and at 1e-3 (LoRA is usually run at a higher lr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "outputs" / "models" / "smollm2-135m-instruct"
TRAIN = REPO / "outputs" / "data" / "real" / "train.jsonl"
DEV = REPO / "outputs" / "data" / "real" / "dev_select.jsonl"

VARIANTS = {
    "full_bf16": ["engine.precision=bf16", "optim.lr=1e-4"],
    "full_fp32": ["engine.precision=fp32", "optim.lr=1e-4"],
    "lora_bf16_lr1e-4": ["engine.precision=bf16", "optim.lr=1e-4", "model.lora.enabled=true"],
    "lora_bf16_lr1e-3": ["engine.precision=bf16", "optim.lr=1e-3", "model.lora.enabled=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", default="/tmp/bench_lora")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    from qwen3train.eval.pairs import evaluate_pairs

    rows = []
    for name, over in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        out = Path(a.work) / name
        cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", "model=smollm2-135m",
               f"model.name_or_path={MODEL}", f"data.train_files=[{TRAIN}]", "engine.micro_batch_size=32",
               "engine.global_batch_size=32", f"run.max_steps={a.steps}", "run.save_every=0", "run.resume=never",
               "optim.warmup_ratio=0.1", f"run.output_dir={out}", *over]
        t = time.time()
        rss = Path(a.work) / f"{name}.maxrss"
        rss.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        wall = time.time() - t
        m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        dev = evaluate_pairs(out / "final", DEV)
        row = {"variant": name, "wall_s": round(wall, 1),
               "step_s_median": round(statistics.median(x["step_time_s"] for x in m[2:]), 2),
               "peak_rss_gib": round(int(rss.read_text().split()[-1]) / 2**20, 2),
               "loss_first": round(m[0]["loss"], 3), "loss_last": round(m[-1]["loss"], 3),
               "dev_ndcg10": round(dev["ndcg@10"], 4)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(a.work, "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
