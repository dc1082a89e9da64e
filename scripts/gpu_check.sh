#!/usr/bin/env bash
# make gpu-check: the CUDA paths of the method in one command (<= 10 minutes on one H100), from a fresh clone.
#   bash scripts/gpu_check.sh [--quick] [--only a_train,d_mine]
# Install, by what the machine offers:
#   PY=<python>   use that interpreter as it is (CI runs the CPU mode this way);
#   .whl/ present  an offline GPU node: its system python3 (with CUDA torch) + the wheels in .whl
#                  (scripts/fetch_gpu_wheels.sh downloads them on a machine with network);
#   otherwise     `make install` (CUDA torch, the deepspeed/dev extras and vLLM on a machine with nvidia-smi).
# Figures go to outputs/gpu_check/results.json and, on a GPU, are appended to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    PY=python3
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qwen3train-site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/qwen3train-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    make install
    PY=.venv/bin/python
  fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DOC=()
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  DOC=(--doc docs/benchmarks.md)
else
  echo "[gpu-check] no CUDA device: running the CPU-capable steps only; the others are reported as skipped" >&2
fi
exec "$PY" bench/gpu_check.py "${DOC[@]}" "$@"
