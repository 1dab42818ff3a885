#!/usr/bin/env bash
# The 2-GPU measurement (kind nvidia-h200-x2), one call: the 1-GPU reference on GPU 0 of the same machine,
# then torchrun on both GPUs, then the comparison (benchmarks/qat_ddp.py). Carry .stage/qat (token ids and
# SmolLM2's config, written by `python benchmarks/qat_ddp.py --dump --tokens ... --config ... --out /tmp`).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
A="--tokens .stage/qat/shakespeare_ids.pt --config .stage/qat/smollm2_config.json --steps ${STEPS:-60} --global-batch ${GB:-16}"
nvidia-smi --query-gpu=name --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/qat_ddp.py $A --out $OUT/one > $OUT/one.log 2>&1 || { tail -30 $OUT/one.log; exit 1; }
torchrun --nproc-per-node 2 benchmarks/qat_ddp.py $A --out $OUT/two > $OUT/two.log 2>&1 || { tail -30 $OUT/two.log; exit 1; }
python3 benchmarks/qat_ddp.py --compare $OUT/one $OUT/two --out $OUT --name ${NAME:-qat_ddp_h200x2}
rm -f $OUT/*/loss.png
