#!/usr/bin/env bash
# Where a stage-1 step's time goes on a GPU, on a random model of Qwen3-0.6B's shape (bf16 compute):
# padded eager vs packed eager vs packed compiled, the top kernels, and a cProfile of the mining check.
#   bash scripts/gpu_profile.sh [OUTDIR]      (the install rules of scripts/gpu_check.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-outputs/gpu_profile}
mkdir -p "$OUTDIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qwen3train-site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/qwen3train-site${PYTHONPATH:+:$PYTHONPATH}"
  PY=python3
else
  PY=${PY:-.venv/bin/python}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
M=outputs/gpu_check/models/qwen3-0.6b-random
"$PY" -c "from qwen3train.models.tiny import QWEN3_0_6B_SHAPE as S, make_tiny_qwen3 as m; m('$M', dtype='bfloat16', **S)"
[ -f outputs/data/train_pairs.jsonl ] || "$PY" -m qwen3train.data.demo outputs/data
COMMON=(engine.precision=bf16 model.name_or_path=$M model.dtype=bfloat16 model.max_query_length=64
        model.max_doc_length=256 run.max_steps=14 run.save_every=0 run.resume=false optim.lr=1e-4
        "data.train_files=[outputs/data/train_pairs.jsonl]")
for v in "padded model.packing=false,model.length_buckets=1,model.compile=false --kernels" \
         "packed model.packing=true,model.compile=false --kernels" "packed-compiled model.packing=true,model.compile=true --kernels"; do
  set -- $v
  "$PY" bench/profile_step.py ${3:-} "${COMMON[@]}" ${2//,/ } engine.micro_batch_size=64 \
    engine.global_batch_size=64 run.output_dir=/tmp/prof-$1 > "$OUTDIR/step_$1.log" 2>&1
  grep -A 20 "Name" "$OUTDIR/step_$1.log" | cut -c1-60,100-200 | head -20
  grep PROFILE "$OUTDIR/step_$1.log" || tail -5 "$OUTDIR/step_$1.log"
done
"$PY" -m cProfile -s cumulative bench/gpu_check.py --section d_mine outputs/gpu_check 0 > "$OUTDIR/mine_cprofile.log" 2>&1
grep RESULT "$OUTDIR/mine_cprofile.log"
grep -A 45 "Ordered by" "$OUTDIR/mine_cprofile.log" | cut -c1-150
