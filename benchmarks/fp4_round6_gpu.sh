#!/usr/bin/env bash
# Round 6 (issue 5) GPU calls: quantize + MoE. Usage on the device machine: bash benchmarks/fp4_round6_gpu.sh explore|final
# Writes logs and JSON under $OUT. Needs the pytest wheels in .stage/enginewhl (carried).
set -o pipefail
export PYTHONUNBUFFERED=1
pip install -q --no-index --no-deps --target /tmp/site .stage/enginewhl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
case "$1" in
explore)
  python benchmarks/bench_fp4_gemm.py --quantize-only --quantize-sweep --out benchmarks/results/fp4_quant_round6_sweep_h100.json 2>&1 | tee $OUT/quant_sweep.log
  python -m pytest -q -x tests/kernels/test_fp4_quantize.py --junitxml=$OUT/quant_tests.xml 2>&1 | tail -15 | tee $OUT/quant_tests.log
  python benchmarks/bench_fp4_moe.py --round6 2>&1 | tee $OUT/moe_round6.log
  python -m pytest -q -x tests/kernels/test_fp4_moe.py --junitxml=$OUT/moe_tests.xml 2>&1 | tail -15 | tee $OUT/moe_tests.log
  ;;
explore2)
  python benchmarks/bench_fp4_moe.py --round6-second 2>&1 | tee $OUT/moe_round6_2.log
  python -m pytest -q tests/kernels/test_fp4_moe.py --junitxml=$OUT/moe_tests.xml 2>&1 | tail -15 | tee $OUT/moe_tests.log
  ;;
lut)
  python benchmarks/bench_fp4_moe.py --round6-lut --formats nvfp4 2>&1 | tee $OUT/moe_round6_3.log
  python -m pytest -q tests/kernels/test_fp4_moe.py -k "lut or pdl or combine or evict" --junitxml=$OUT/moe_tests.xml 2>&1 | tail -15 | tee $OUT/moe_tests.log
  ;;
final)
  python benchmarks/bench_fp4_gemm.py --quantize-only --out benchmarks/results/fp4_quant_round6_h100.json 2>&1 | tee $OUT/quant.log
  python benchmarks/bench_fp4_moe.py --layer-variants --out benchmarks/results/fp4_moe_round6_h100.json 2>&1 | tee $OUT/moe.log
  python -m pytest -q tests/kernels/test_fp4_quantize.py tests/kernels/test_fp4_moe.py --junitxml=$OUT/tests.xml 2>&1 | tail -15 | tee $OUT/tests.log
  ;;
esac
