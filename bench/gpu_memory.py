"""gpu-check section h: out of GPU memory far into a run, with CUDA's own allocator (the CPU tests simulate it:
``tests/train/test_memory.py``).

The tiny Qwen3 on the first 159 records of stage 2's demo data (3 hard negatives, documents up to 4,096
tokens), then on the same plus one record of four 4,096-token texts, which the seed's order draws at step 9 of
12. The short data alone gives the peak of an ordinary step; then the process is held to that peak plus
``MARGIN_GIB`` (``torch.cuda.set_per_process_memory_fraction``, through ``tests/faults.py``) and the data with
the long record runs twice: with the memory rehearsal (the CUDA default) it must stop after step 1 with the one
line; without it, at the step that draws the record, with the line naming that step and the checkpoint kept.
Each run: status, the last line, the steps logged, the rehearsal's line, peak memory.

Then inference (``models/fit.py``), in a process of its own: the tiny Qwen3 encodes 48 texts of 4,096 tokens at
32,768 tokens a forward, once freely (its peak), then held to the weights plus a third of that peak: the encode
must say once that it goes on in smaller forwards and return the same vectors (``encode``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARGIN_GIB = 0.25


def _data(src: Path, out: Path) -> tuple[Path, Path]:
    """(short, long): 159 records; the same with the long one (160: 10 steps an epoch, every record drawn)."""
    lines = src.read_text().splitlines()[:159]
    out.mkdir(parents=True, exist_ok=True)
    short = out / "train_hn_short.jsonl"
    short.write_text("\n".join(lines) + "\n")
    long = {"query": "why " + "glacier tensor ocean " * 20, "pos": ["kernel sonnet market " * 1500],
            "neg": [f"violin galaxy {i} " * 2000 for i in range(3)],
            "task": json.loads(lines[0]).get("task", "default")}  # batches are drawn within a task
    lines.insert(120, json.dumps(long))
    (out / "train_hn_long.jsonl").write_text("\n".join(lines) + "\n")
    return short, out / "train_hn_long.jsonl"


def _run(out: Path, name: str, data: Path, args: list[str], fraction: float | None) -> dict:
    run_dir = out / "memory" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "tests" / "faults.py"), "--config-name=stage2", "model=tiny",
           f"model.name_or_path={out / 'models' / 'tiny-qwen3'}", "model.init_from=null", "model.dtype=float32",
           "model.max_query_length=64", "model.max_doc_length=4096", f"data.train_files=[{data}]",
           "data.num_hard_negatives=3", "engine.global_batch_size=16", "engine.micro_batch_size=4",
           "engine.grad_cache=true", "run.max_steps=12", "run.save_every=2", "run.resume=never",
           f"run.output_dir={run_dir}", *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if fraction is not None:
        env["QWEN3TRAIN_TEST_FAULT"] = f"cuda_memory_fraction:{fraction:.6f}"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    lines = proc.stderr.strip().splitlines()
    return {"status": proc.returncode, "steps": len(rows), "last_line": lines[-1][:600] if lines else "",
            "rehearsal": next((x for x in proc.stdout.splitlines() if x.startswith("memory rehearsal")), None),
            "peak_gib": round(max((r.get("gpu_mem_gib", 0) for r in rows), default=0), 3)}


def section_memory(out: Path, quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA (the CPU equivalent is tests/train/test_memory.py)"}
    from qwen3train.models.tiny import make_tiny_qwen3

    make_tiny_qwen3(out / "models" / "tiny-qwen3")
    demo = REPO / "outputs" / "data" / "train_hn.jsonl"
    if not demo.exists():
        subprocess.run([sys.executable, "-m", "qwen3train.data.demo", str(demo.parent)], check=True, cwd=REPO)
    short, data = _data(demo, out / "memory")
    res = {"ordinary": _run(out, "ordinary", short, ["engine.rehearse_memory=false"], None)}
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    fraction = (res["ordinary"]["peak_gib"] + MARGIN_GIB) / total
    res["fraction"] = round(fraction, 6)
    res["rehearsed"] = _run(out, "rehearsed", data, [], fraction)
    res["not_rehearsed"] = _run(out, "not_rehearsed", data, ["engine.rehearse_memory=false"], fraction)
    res["encode"] = _encode(out / "models" / "tiny-qwen3")
    r, n = res["rehearsed"], res["not_rehearsed"]
    step = re.search(r"at step (\d+) of", n["last_line"])
    res["met"] = (res["ordinary"]["status"] == 0 and r["status"] == 2 and r["steps"] == 1
                  and "out of GPU memory in the memory rehearsal after step 1" in r["last_line"]
                  and n["status"] == 2 and step is not None and int(step.group(1)) > 1
                  and "is intact" in n["last_line"] and res["encode"].get("met") is True)
    return res


def _encode(model_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "encode", str(model_dir)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    got = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not got:
        return {"status": proc.returncode, "stderr": proc.stderr[-1500:], "met": False}
    return json.loads(got[-1])


def _encode_child(model_dir: str) -> dict:
    """Run as its own process: the memory fraction it sets stays with it."""
    import io
    from contextlib import redirect_stdout

    import torch

    from qwen3train.models.build import ModelConfig, build_embedder

    model = build_embedder(ModelConfig(name_or_path=model_dir, max_doc_length=4096)).cuda()
    texts = [f"violin galaxy {i} kernel sonnet market " * 800 for i in range(48)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ref = model.encode(texts, batch_tokens=32768)
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()  # cached blocks would serve the second run under any limit
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = (torch.cuda.memory_reserved() + peak / 3) / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    said = io.StringIO()
    with redirect_stdout(said):
        got = model.encode(texts, batch_tokens=32768)
    notes = [x for x in said.getvalue().splitlines() if x.startswith("note: out of device memory")]
    diff = float((got - ref).abs().max())
    return {"peak_gib": round(peak / 2 ** 30, 3), "fraction": round(fraction, 6), "notes": notes,
            "cap_tokens": model.fit.cap, "max_abs_diff": diff,
            "met": len(notes) == 1 and model.fit.cap is not None and model.fit.cap < 32768 and diff < 1e-3}


if __name__ == "__main__" and sys.argv[1:2] == ["encode"]:
    sys.path.insert(0, str(REPO))
    print(json.dumps(_encode_child(sys.argv[2])))
