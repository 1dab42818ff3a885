#!/usr/bin/env bash
# One lent-GPU call of the PTQ matrix (benchmarks/ptq_matrix.py): assemble the staged GGUF, run some
# variants with a deadline, keep the JSONL in /root/stash (resumed by the next call), copy it to $OUT.
#   bash benchmarks/ptq_matrix_gpu.sh STAGE_NAME LABEL [ptq_matrix.py run options...]
set -uo pipefail
name=$1 label=$2; shift 2
bash benchmarks/gpu_stage.sh "$name" || exit 0
log=/root/stash/ptq_matrix_$label.jsonl
PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/ptq_matrix.py run "/root/stash/$name.gguf" .stage/items \
  --out "$log" --label "$label" "$@" 2>&1 | grep -v -E "Converting and de-quantizing|Loading weights|Warning"
cp "$log" "$OUT/"
