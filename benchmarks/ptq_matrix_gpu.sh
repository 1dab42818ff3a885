#!/usr/bin/env bash
# One lent-GPU call of the PTQ matrix (benchmarks/ptq_matrix.py): assemble the staged GGUF, run some variants
# with a deadline, appending to $OUT/<basename of RESULTS> seeded from the repo's RESULTS (so the next call
# resumes from what you copied back, and a call killed at its limit still returns every finished variant).
#   bash benchmarks/ptq_matrix_gpu.sh STAGE_NAME LABEL RESULTS.jsonl [ptq_matrix.py run options...]
# SRC=DIR runs fp4kit and the benchmark scripts from DIR (a carried snapshot of a commit, so other people's
# uncommitted edits in the working tree do not change the measurement), default the working tree.
# TOKENIZER=DIR unpacks DIR/tokenizer.json.xz (from `ptq_matrix.py save-tokenizer`; checked against its
# SHA-256) and passes --tokenizer: needed for Gemma-3, whose GGUF tokenizer transformers 5.17 builds wrongly.
set -uo pipefail
name=$1 label=$2 results=$3; shift 3
src=${SRC:-.}
bash benchmarks/gpu_stage.sh "$name" || exit 0
extra=()
if [ -n "${TOKENIZER:-}" ]; then
  tok=/tmp/tok-$name; mkdir -p "$tok"; cp "$TOKENIZER/tokenizer_config.json" "$tok/"
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$TOKENIZER/tokenizer.json.xz" "$tok/tokenizer.json"
  echo "$(cat "$TOKENIZER/tokenizer.json.sha256")  $tok/tokenizer.json" | sha256sum -c --quiet || exit 4
  extra=(--tokenizer "$tok")
fi
out="$OUT/$(basename "$results")"
[ -f "$results" ] && cp "$results" "$out"
PYTHONPATH=/tmp/site:$src PYTHONUNBUFFERED=1 python3 "$src/benchmarks/ptq_matrix.py" run "/root/stash/$name.gguf" \
  .stage/items --out "$out" --label "$label" "${extra[@]}" "$@" 2>&1 \
  | grep --line-buffered -v -E "Converting and de-quantizing|Loading weights|Warning|W1123|torchao"
