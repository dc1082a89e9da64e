"""How long a checkpoint save stops training: in the foreground vs in the background (``run.save_in_background``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_save.py [--model outputs/models/smollm2-135m-instruct]
        [--steps 8] [--save-every 2] [--repeats 2] [--engine torch|fsdp] [--batch 16]

Stage 1 of a real backbone (SmolLM2-135M by default: a 2.0 GiB checkpoint, fp32 weights and AdamW's two moments
plus the export) on the demo pairs, a save every ``--save-every`` steps; each variant in a process of its own, the
two alternating. Per run: the seconds the training thread spent in the saves of the steps before the last
(``checkpoint.begin`` + ``Pending.finish``: the copy to host memory, and whatever was left to wait for), the
seconds those saves took to be written in all (foreground: the same), the run's wall time, and a digest of every
checkpoint's checksums (the files must be the same byte for byte). On a GPU node the writer's thread has cores of
its own; on 2 CPU cores it shares them with training, so the wall time gains less than the stall does.
Results: ``outputs/bench/bench_save.json``.

``--gil``: does the writer's thread hold the interpreter lock for long? A loop of small matmuls (what launches a
GPU's kernels) alone for 2 s, then beside a thread doing three ``torch.save`` to a path, or into an open file (as the
checkpoint writer does), or XXH3 hashes, or safetensors saves of 200 MB: its throughput and its longest gap between two
iterations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

SCRIPT = r"""
import hashlib, json, sys, time
from pathlib import Path
sys.path.insert(0, "tests"); sys.path.insert(0, "tests/train")
from qwen3train.startup import lean_transformers
lean_transformers()
from helpers import train_cfg
from qwen3train.integrity import recorded
from qwen3train.train import checkpoint
from qwen3train.train.loop import run

model, data, out, steps, every, background, engine, batch = sys.argv[1:9]
stalls, begun = [], {}
real_begin, real_finish = checkpoint.begin, checkpoint.Pending.finish

def begin(root, state, *a, **kw):
    t = time.perf_counter()
    p = real_begin(root, state, *a, **kw)
    begun[p.step] = t
    stalls.append(["begin", p.step, time.perf_counter() - t])
    return p

def finish(self, *a, **kw):
    t = time.perf_counter()
    path = real_finish(self, *a, **kw)
    stalls.append(["finish", self.step, time.perf_counter() - t, time.perf_counter() - begun[self.step]])
    return path

checkpoint.begin, checkpoint.Pending.finish = begin, finish
cfg = train_cfg(model, data, out, max_steps=int(steps), save_every=int(every), keep_last=100, micro=int(batch),
                global_batch=int(batch), k=0)
cfg.model.max_query_length, cfg.model.max_doc_length = 64, 128
cfg.engine.backend = engine
cfg.run.save_in_background = background == "1"
t0 = time.perf_counter()
run(cfg)
wall = time.perf_counter() - t0
last = int(steps)
stall = sum(s[2] for s in stalls if s[1] < last)
written = [s[3] for s in stalls if s[0] == "finish" and s[1] < last]
# (FSDP's .metadata names its folder and a random id of the save: left out)
digest = hashlib.sha256(json.dumps([sorted((k, v) for k, v in recorded(c).items() if not k.endswith("/.metadata"))
                                    for c in sorted(Path(out, "checkpoints").glob("step_*")) if int(c.name[5:]) < last],
                                   sort_keys=True).encode()).hexdigest()
print(json.dumps({"stall_s": stall, "saves": len(written), "written_s": sum(written), "wall_s": wall,
                  "digest": digest}))
"""


def gil() -> None:
    import threading
    import time

    import torch
    from safetensors.torch import save_file

    from qwen3train.integrity import file_digest

    torch.set_num_threads(1)
    big, x = {"a": torch.randn(50_000_000)}, torch.randn(64, 64)
    work = REPO / "outputs" / "bench" / "gil"
    work.mkdir(parents=True, exist_ok=True)

    def loop(seconds: float) -> tuple[float, float]:
        n, t0, worst = 0, time.perf_counter(), 0.0
        last = t0
        while time.perf_counter() - t0 < seconds:
            x @ x
            n, now = n + 1, time.perf_counter()
            worst, last = max(worst, now - last), now
        return n / seconds, worst

    def into_file() -> None:  # what the checkpoint writer does
        with open(work / "big.pt", "wb") as f:
            torch.save(big, f)

    jobs = {"torch.save(path)": lambda: torch.save(big, work / "big.pt"), "torch.save(open file)": into_file,
            "xxh3": lambda: file_digest(work / "big.pt"), "safetensors": lambda: save_file(big, str(work / "big.st"))}
    torch.save(big, work / "big.pt")
    for name, job in jobs.items():
        alone = loop(2.0)
        th = threading.Thread(target=lambda: [job() for _ in range(3)])
        th.start()
        beside = loop(2.0)
        th.join()
        print(f"{name}: matmuls/s alone {alone[0]:.0f}, beside {beside[0]:.0f} ({beside[0] / alone[0] - 1:+.1%}); "
              f"longest gap alone {alone[1] * 1e3:.1f} ms, beside {beside[1] * 1e3:.1f} ms")


def main() -> None:
    from alternate import run_alternating, save, summarise

    if "--gil" in sys.argv:
        sys.path.insert(0, str(REPO))
        return gil()

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "outputs" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--data", default=str(REPO / "outputs" / "data" / "train_pairs.jsonl"), help="made if missing")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--batch", type=int, default=16, help="queries a step (one micro batch)")
    args = ap.parse_args()
    work = REPO / "outputs" / "bench" / "save"
    if not Path(args.data).exists():
        sys.path.insert(0, str(REPO))
        from qwen3train.data.demo import build

        build(Path(args.data).parent)

    def argv(variant: str) -> list[str]:
        out = work / variant
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        return [args.model, args.data, str(out), str(args.steps), str(args.save_every),
                "1" if variant == "background" else "0", args.engine, str(args.batch)]

    got = run_alternating(SCRIPT, ["foreground", "background"], argv, args.repeats)
    res = summarise(got, ("stall_s", "written_s", "wall_s"))
    res["stall_ratio"] = res["foreground_stall_s"] / max(res["background_stall_s"], 1e-9)
    res["wall_ratio"] = res["foreground_wall_s"] / res["background_wall_s"]
    save("bench_save", res)


if __name__ == "__main__":
    main()
