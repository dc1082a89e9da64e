"""GGUF -> safetensors conversion (``synth.models.convert_gguf``, what `make pipeline` and the family tests run
once per machine) with each GGUF file parsed once vs as transformers does it (4 parses: config, weights, twice
for the tokenizer; gguf's tensor-name map rebuilt per module), alternating, in fresh processes.

    .venv/bin/python bench/bench_gguf_convert.py [--repeats 2]

Checks that both write byte-identical folders. Results: ``outputs/bench/gguf_convert.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE = """
import contextlib, sys, time
from pathlib import Path
import qwen3train.synth.models as m
if sys.argv[2] == "parsed-per-call":
    m._gguf_read_once = contextlib.nullcontext
out, which = Path(sys.argv[1]), sys.argv[3]
gguf = m.smollm2_gguf() if which == "smollm2-135m" else m.qwen25_coder_gguf(out.parent / "gguf")
t = time.perf_counter()
m.convert_gguf(gguf, out, dtype="float32" if which == "smollm2-135m" else "bfloat16")
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("smollm2-135m", "qwen2.5-coder-0.5b"):
            times = {"parsed-per-call": [], "parsed-once": []}
            for r in range(a.repeats):
                for variant in times:
                    out = Path(tmp) / f"{variant}-{r}"
                    proc = subprocess.run([sys.executable, "-c", ONE, str(out), variant, model], cwd=REPO,
                                          capture_output=True, text=True, check=True)
                    times[variant].append(float(proc.stdout.strip().splitlines()[-1]))
            a_dir, b_dir = Path(tmp) / "parsed-per-call-0", Path(tmp) / "parsed-once-0"
            same = all(f.read_bytes() == (b_dir / f.name).read_bytes() for f in a_dir.iterdir() if f.is_file())
            med = {k: statistics.median(v) for k, v in times.items()}
            results[model] = {"seconds": times, "median": med, "speedup": med["parsed-per-call"] / med["parsed-once"],
                              "identical_files": same}
            print(model, json.dumps(results[model]), flush=True)
            for r in range(a.repeats):
                for variant in times:
                    shutil.rmtree(Path(tmp) / f"{variant}-{r}", ignore_errors=True)
    out = REPO / "outputs" / "bench" / "gguf_convert.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
