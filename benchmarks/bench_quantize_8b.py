"""Time to quantize a Llama-3-8B-shaped model (random weights, built on the GPU) with fp4kit.

    python benchmarks/bench_quantize_8b.py [--out benchmarks/results/quantize_8b_h100.json]

Measures, on the device the model lives on: `quantize_` RTN to NVFP4 and MXFP4 (all 224 linear layers,
lm_head ignored), the bytes before and after, and GPTQ on one decoder layer's seven linears from
Hessians of 16 x 2048 random-token activations (the per-layer cost that a full sequential run pays
32 times; calibration forwards not included). Each timing is one run after a warm-up on a small
layer (the work is long enough that launch jitter does not matter), with CUDA synchronised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

import fp4kit
from fp4kit.algorithms import GPTQConfig, apply_gptq, collect_hessians
from fp4kit.engine.random_model import random_llama
from fp4kit.formats import MXFP4Config, NVFP4Config


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def linear_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/quantize_8b_h100.json")
    args = p.parse_args()
    rows = []
    warm = torch.nn.Sequential(torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16))
    fp4kit.quantize_(warm, NVFP4Config(), ignore=(), progress=False)
    for config in (NVFP4Config(), MXFP4Config()):
        model = random_llama("cuda")
        before = linear_bytes(model)
        report, seconds = timed(lambda: fp4kit.quantize_(model, config, progress=False))
        after = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, fp4kit.FP4Linear)
                    for b in m.buffers())
        rows.append({"what": f"quantize_ RTN {config.name}", "layers": len(report.quantized), "seconds": seconds,
                     "bf16_linear_bytes": before, "fp4_linear_bytes": after})
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    model = random_llama("cuda", num_hidden_layers=1)
    gen = torch.Generator("cuda").manual_seed(0)
    batches = [torch.randint(0, 128256, (1, 2048), device="cuda", generator=gen) for _ in range(16)]
    hessians, t_h = timed(lambda: collect_hessians(model, batches, NVFP4Config(), progress=False))
    result, t_g = timed(lambda: apply_gptq(model, NVFP4Config(), hessians, GPTQConfig(), progress=False))
    rows.append({"what": "GPTQ NVFP4, one decoder layer (7 linears)", "hessian_seconds": t_h, "gptq_seconds": t_g,
                 "layers": len(result.output_error), "estimate_32_layers_seconds": 32 * (t_h + t_g)})
    print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
