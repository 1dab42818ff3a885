#!/usr/bin/env bash
# Build the separate venv that benchmarks/llmcompressor_compare.py runs llm-compressor in.
# llm-compressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19, which fp4kit's own
# venv does not have. torch 2.13.0 goes in first, as install.sh does (on our machines a local CPU
# build; naming it first keeps pip from pulling CUDA wheels for it), then llm-compressor with its pins.
set -euo pipefail
VENV=${1:-/work/llmc-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/pip" install -q --disable-pip-version-check \
  "llmcompressor==0.14.0.1" "transformers==5.17.0" "compressed-tensors==0.19.0"
"$VENV/bin/python" - <<'PY'
import torch, llmcompressor, transformers, compressed_tensors
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
print("llm-compressor venv:", "torch", torch.__version__, "llmcompressor", llmcompressor.__version__,
      "transformers", transformers.__version__, "compressed-tensors", compressed_tensors.__version__)
PY
