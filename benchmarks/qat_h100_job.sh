#!/usr/bin/env bash
# The H100 measurement of issue 7's remaining parts, in one call (see docs/qat.md):
#   QAD from GPTQ starts (NVFP4, MXFP4 W4A16; same budget/evaluation as the RTN runs) and the upcycled MoE
#   with MXFP4 RCEIL experts, three processes sharing the GPU. Stages SmolLM2's GGUF from two carried parts
#   (benchmarks/stage_model.sh FILE smollm2): a call carrying part00 stores it in /root/stash; a call carrying
#   part01 (or finding the file assembled) runs the job. Usage: bash benchmarks/qat_h100_job.sh PART
set -uo pipefail
sha=$(cat .stage/smollm2/sha256 2>/dev/null || echo b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)
M=/root/stash/smollm2.gguf
mkdir -p /root/stash
[ -f ".stage/smollm2/$1" ] && cp ".stage/smollm2/$1" /root/stash/
if ! (sha256sum $M 2>/dev/null | grep -q "$sha"); then
  if [ -f /root/stash/part00 ] && [ -f /root/stash/part01 ]; then cat /root/stash/part00 /root/stash/part01 > $M; fi
fi
if ! (sha256sum $M 2>/dev/null | grep -q "$sha"); then echo "STAGED $1 only; call again with the other part"; ls -la /root/stash; exit 0; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
T=.stage/qat/shakespeare.txt
nvidia-smi --query-gpu=name,memory.used --format=csv
for s in nvfp4 mxfp4; do
  python3 benchmarks/qat_smollm2.py --model $M --text $T --tasks-json .stage/qat/tasks.json --schemes $s --starts gptq \
    --out $OUT/$s --runs-dir /tmp/runs_$s > $OUT/$s.log 2>&1 &
done
python3 benchmarks/qat_moe_upcycle.py --model $M --text $T --swiglu-clamp 10 --steps 300 --train-budget-s ${MOE_BUDGET:-270} \
  --out $OUT/moe > $OUT/moe.log 2>&1 &
wait
rm -rf $OUT/*/*.png $OUT/moe/moe_run
for f in $OUT/*.log; do echo "== $f"; grep -v "Warning\|warn(" $f | tail -n 8; done
